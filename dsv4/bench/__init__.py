"""Serving benchmark for any OpenAI-compatible endpoint (talks HTTP only; no torch).

Modules, each with one job:
  datasets  random / ShareGPT / JSONL prompts
  loadgen   fixed concurrency, Poisson / gamma arrivals, warm-up, --duration
  client    one streamed request -> RequestRecord (records.py)
  metrics   vLLM-defined TTFT / TPOT / ITL / E2EL, goodput, cost per million tokens
  report    result JSON, terminal table, PNG plots
  compare   side-by-side markdown + PNG of two or more runs
  cli       `dsv4 bench serve | sweep | compare`
"""
