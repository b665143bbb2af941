"""The OpenAI- and Anthropic-compatible HTTP server (`dsv4 serve`).

engine_loop (AsyncEngine: the engine stepped by a background thread, a stream per request),
service (requests -> prompts and SamplingParams; outputs -> parsed deltas, shared by both APIs),
openai_api / anthropic_api (the routers), schemas, errors, metrics, streaming, app, cli.
"""
