"""`dsv4 bench serve | sweep | compare`: load-test any OpenAI-compatible endpoint.

  dsv4 bench serve --base-url http://127.0.0.1:8000 --model NAME \\
      --dataset random --input-len 512 --output-len 128 --num-prompts 200 --concurrency 16
  dsv4 bench sweep --base-url ... --concurrency 1,4,16,64 --num-prompts 64
  dsv4 bench compare h100.json ascend.json --output report.md --plot report.png

Flag names follow `vllm bench serve` where it has one (--dataset-name, --max-concurrency and
--save-result-style names are accepted as aliases).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from dsv4.bench.datasets import DATASETS, TextTokenizer, load_requests
from dsv4.bench.metrics import compute_metrics, parse_slo


def _add_run_arguments(p: argparse.ArgumentParser, sweep: bool) -> None:
    g = p.add_argument_group("endpoint")
    g.add_argument("--base-url", required=True, help="server root, e.g. http://127.0.0.1:8000")
    g.add_argument("--endpoint", default="/v1/chat/completions",
                   help="/v1/chat/completions (default) or /v1/completions")
    g.add_argument("--model", default="", help="model name; default: first in /v1/models")
    g.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                   help="bearer token (default: $OPENAI_API_KEY); never written to results")
    g.add_argument("--ignore-eos", action="store_true",
                   help="ask the server to generate exactly max_tokens (vLLM/SGLang/dsv4)")
    g.add_argument("--extra-body", default=None, help="JSON object merged into every request")
    g.add_argument("--timeout", type=float, default=600.0, help="per-request timeout, s")

    g = p.add_argument_group("workload")
    g.add_argument("--dataset", "--dataset-name", dest="dataset", default="random",
                   choices=DATASETS)
    g.add_argument("--dataset-path", default=None, help="ShareGPT JSON or JSONL prompt file")
    g.add_argument("--tokenizer", default=None,
                   help="tokenizer.json (or folder) of the served model: exact random-prompt "
                        "lengths, ShareGPT output sizes, and token counts when no usage comes")
    g.add_argument("--input-len", type=int, default=1024, help="random: prompt tokens")
    g.add_argument("--output-len", type=int, default=None,
                   help="max_tokens per request (random default 128; overrides file lengths)")
    g.add_argument("--range-ratio", "--random-range-ratio", dest="range_ratio", type=float,
                   default=0.0, help="random: lengths uniform in L*(1-r)..L*(1+r)")
    g.add_argument("--seed", type=int, default=0)

    g = p.add_argument_group("load shape")
    if sweep:
        g.add_argument("--concurrency", "--max-concurrency", dest="concurrency", required=True,
                       help="comma-separated levels, e.g. 1,4,16,64")
    else:
        g.add_argument("--concurrency", "--max-concurrency", dest="concurrency", type=int,
                       default=None, help="most requests in flight (default: unlimited)")
    g.add_argument("--request-rate", type=float, default=math.inf,
                   help="mean arrivals per second, Poisson/gamma (default inf: all at once)")
    g.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape: 1 Poisson, <1 burstier, >1 steadier")
    g.add_argument("--num-prompts", type=int, default=None,
                   help="requests per run (default 100 unless --duration)")
    g.add_argument("--duration", type=float, default=None,
                   help="seconds to keep sending instead of --num-prompts")
    g.add_argument("--num-warmups", type=int, default=1, help="warm-up requests, excluded")

    g = p.add_argument_group("results")
    g.add_argument("--slo", default=None, help="goodput SLO, e.g. ttft_ms=500,tpot_ms=50")
    g.add_argument("--price-per-hour", type=float, default=None,
                   help="USD per device-hour, for cost per million tokens")
    g.add_argument("--devices", type=int, default=1, help="devices serving the model")
    g.add_argument("--label", default=None, help="name of this run in reports")
    g.add_argument("--result-file", default=None,
                   help="result JSON path (default ./dsv4-bench-<time>.json)")
    g.add_argument("--prediction", default=None,
                   help="planner bound JSON to store with the result (see bench compare)")
    g.add_argument("--no-plot", action="store_true", help="skip the PNG plots")
    g.add_argument("--disable-tqdm", "--no-progress", dest="no_progress", action="store_true")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    _PARSERS["serve"] = sub.add_parser("serve", help="one benchmark run against an endpoint")
    _add_run_arguments(_PARSERS["serve"], sweep=False)
    _PARSERS["sweep"] = sub.add_parser("sweep", help="one run per --concurrency level, plots")
    _add_run_arguments(_PARSERS["sweep"], sweep=True)
    p = _PARSERS["compare"] = sub.add_parser("compare", help="side-by-side markdown + PNG")
    p.add_argument("results", nargs="+", help="result JSON files; the first is baseline A")
    p.add_argument("--prediction", action="append", default=[], metavar="LABEL=FILE",
                   help="planner bound for the run with this label (or 0-based index)")
    p.add_argument("--output", default=None, help="markdown path (default: print)")
    p.add_argument("--plot", default=None, help="PNG path for the comparison chart")
    p.add_argument("--json", default=None, help="also write the comparison numbers here")


_PARSERS: dict[str, argparse.ArgumentParser] = {}


def _command_line(args: argparse.Namespace) -> list[str]:
    """The run as a `dsv4 bench` command with every non-default flag, api key masked.

    Rebuilt from the parsed arguments (not sys.argv) so it is right however the command was
    started: console script, `python -m dsv4.cli`, or `dsv4.cli.main([...])` from Python.
    """
    parser = _PARSERS[args.action]
    out = ["dsv4", "bench", args.action]
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help",):
            continue
        value = getattr(args, action.dest, None)
        if value == action.default or value is None:
            continue
        flag = action.option_strings[0]
        if action.dest == "api_key":
            out += [flag, "***"]
        elif isinstance(action, argparse._StoreTrueAction):
            out.append(flag)
        elif isinstance(value, list):
            for v in value:
                out += [flag, str(v)]
        else:
            out += [flag, str(value)]
    if args.action == "compare":
        out += list(args.results)
    return out


def _config(args: argparse.Namespace, concurrency: int | None, model: str) -> dict[str, Any]:
    return {
        "base_url": args.base_url, "endpoint": args.endpoint, "model": model,
        "dataset": args.dataset, "dataset_path": args.dataset_path, "tokenizer": args.tokenizer,
        "input_len": args.input_len if args.dataset == "random" else None,
        "output_len": args.output_len, "range_ratio": args.range_ratio,
        "num_prompts": args.num_prompts, "duration_s": args.duration,
        "concurrency": concurrency,
        "request_rate": "inf" if math.isinf(args.request_rate) else args.request_rate,
        "burstiness": args.burstiness, "num_warmups": args.num_warmups, "seed": args.seed,
        "ignore_eos": args.ignore_eos, "extra_body": _extra_body(args),
        "slo_ms": parse_slo(args.slo), "price_per_device_hour_usd": args.price_per_hour,
        "num_devices": args.devices, "timeout_s": args.timeout,
    }


def _extra_body(args: argparse.Namespace) -> dict[str, Any]:
    if not args.extra_body:
        return {}
    try:
        body = json.loads(args.extra_body)
    except ValueError as exc:
        raise ValueError(f"--extra-body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ValueError("--extra-body must be a JSON object, e.g. '{\"temperature\": 0}'")
    return body


async def _run_once(args: argparse.Namespace, concurrency: int | None,
                    tokenizer: TextTokenizer | None) -> dict[str, Any]:
    """One benchmark run -> the result document (not yet written)."""
    import httpx

    from dsv4.bench.client import Endpoint, fetch_models, first_model_id, send_request
    from dsv4.bench.loadgen import LoadShape, run_load
    from dsv4.bench.report import build_result

    if args.num_prompts is None and args.duration is None:
        args.num_prompts = 100
    if not 0 < args.timeout < math.inf:
        raise ValueError(f"--timeout must be a positive number of seconds, got {args.timeout}")
    shape = LoadShape(concurrency=concurrency, request_rate=args.request_rate,
                      burstiness=args.burstiness, num_prompts=args.num_prompts,
                      duration_s=args.duration, num_warmups=args.num_warmups, seed=args.seed)
    slo = parse_slo(args.slo)
    # in --duration mode the prompt list is cycled; 1000 distinct prompts is plenty
    samples = load_requests(
        args.dataset, args.num_prompts or 1000, dataset_path=args.dataset_path,
        input_len=args.input_len, output_len=args.output_len, tokenizer=tokenizer,
        range_ratio=args.range_ratio, seed=args.seed,
    )
    endpoint = Endpoint(base_url=args.base_url, model=args.model, path=args.endpoint,
                        api_key=args.api_key, ignore_eos=args.ignore_eos,
                        extra_body=_extra_body(args), timeout_s=args.timeout)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(args.timeout, connect=min(30.0, args.timeout))
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        models = await fetch_models(client, endpoint)
        if not endpoint.model:
            endpoint.model = first_model_id(models) or ""
            if not endpoint.model:
                raise ValueError(
                    f"could not read a model name from {endpoint.base_url}/v1/models "
                    f"({models.get('error', 'empty list')}); pass --model NAME"
                )

        progress = None
        if not args.no_progress:
            from tqdm import tqdm

            progress = tqdm(total=args.num_prompts, unit="req", file=sys.stderr,
                            desc=f"c={concurrency or 'inf'}", dynamic_ncols=True)

        def on_done(record: Any) -> None:
            if progress is not None:
                progress.update(1)
                if not record.success:
                    progress.set_postfix_str("failed: " + record.error[:60])

        load = await run_load(
            samples, lambda s, i, t0: send_request(client, endpoint, s, i, t0), shape,
            on_done=on_done,
        )
        if progress is not None:
            progress.close()

    metrics = compute_metrics(
        load.records, load.duration_s, slo_ms=slo,
        count_tokens=tokenizer.count if tokenizer else None,
        price_per_device_hour=args.price_per_hour, num_devices=args.devices,
    )
    prediction = None
    if args.prediction:
        from dsv4.bench.compare import load_prediction

        prediction = load_prediction(args.prediction)
    label = args.label or endpoint.model
    if args.action == "sweep":
        label += f" c={concurrency}"
    return build_result(
        label=label, config=_config(args, concurrency, endpoint.model), metrics=metrics,
        records=load.records, warmup=load.warmup_records, server_models=models,
        command_line=_command_line(args), prediction=prediction,
    )


def _default_result_path() -> Path:
    return Path(f"dsv4-bench-{time.strftime('%Y%m%d-%H%M%S')}.json")


def _tokenizer(args: argparse.Namespace) -> TextTokenizer | None:
    return TextTokenizer(args.tokenizer) if args.tokenizer else None


def _serve(args: argparse.Namespace) -> int:
    from dsv4.bench.report import plot_latency_cdfs, print_summary, write_json

    result = asyncio.run(_run_once(args, args.concurrency, _tokenizer(args)))
    path = write_json(result, args.result_file or _default_result_path())
    print_summary(result)
    print(f"result: {path}")
    if not args.no_plot and result["metrics"]["completed"]:
        print(f"plot: {plot_latency_cdfs(result, path.with_suffix('.cdf.png'))}")
    return 0 if result["metrics"]["completed"] else 1


def _parse_levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--concurrency {text!r} must be integers like 1,4,16,64") from None
    if not levels or min(levels) < 1:
        raise ValueError(f"--concurrency {text!r} needs levels of at least 1")
    return levels


def _sweep(args: argparse.Namespace) -> int:
    from dsv4.bench.report import plot_sweep, print_summary, sweep_document, write_json

    levels = _parse_levels(args.concurrency)
    tokenizer = _tokenizer(args)
    path = Path(args.result_file) if args.result_file else _default_result_path()
    results = []
    for level in levels:
        result = asyncio.run(_run_once(args, level, tokenizer))
        write_json(result, path.with_name(f"{path.stem}.c{level}.json"))
        print_summary(result)
        results.append(result)
    sweep = sweep_document(results, _command_line(args))
    write_json(sweep, path)
    print(f"sweep result: {path}")
    if not args.no_plot:
        print(f"plot: {plot_sweep(sweep, path.with_suffix('.png'))}")
    return 0 if all(r["metrics"]["completed"] for r in results) else 1


def _compare(args: argparse.Namespace) -> int:
    from dsv4.bench.compare import (
        compare_results,
        load_prediction,
        plot_comparison,
        render_markdown,
        run_labels,
    )
    from dsv4.bench.report import load_result, write_json

    results = [load_result(p) for p in args.results]
    labels = run_labels(results)
    for item in args.prediction:
        key, sep, file = item.partition("=")
        if not sep:
            raise ValueError(f"--prediction {item!r} must be LABEL=FILE or INDEX=FILE")
        if key in labels:
            idx = labels.index(key)
        elif key.isdigit() and int(key) < len(results):
            idx = int(key)
        else:
            raise ValueError(f"--prediction {key!r} matches no run; runs are {labels}")
        results[idx]["prediction"] = load_prediction(file)
    comparison = compare_results(results)
    markdown = render_markdown(comparison)
    if args.output:
        Path(args.output).write_text(markdown, encoding="utf-8")
        print(f"report: {args.output}")
    else:
        print(markdown)
    if args.plot:
        print(f"plot: {plot_comparison(comparison, args.plot)}")
    if args.json:
        write_json(comparison, args.json)
    return 0


def _check_writable(path: Path, option: str) -> None:
    """Fail before a run of minutes, not after it, when its result could not be saved."""
    existed = path.exists()
    try:
        with open(path, "a"):
            pass
    except OSError as exc:
        raise ValueError(f"{option} {path}: cannot write there ({exc.strerror or exc}); "
                         "pick a file in a folder you can write to") from None
    if not existed:
        path.unlink()


def run(args: argparse.Namespace) -> int:
    if args.action in ("serve", "sweep") and args.result_file:
        _check_writable(Path(args.result_file), "--result-file")
    if args.action == "serve":
        return _serve(args)
    if args.action == "sweep":
        return _sweep(args)
    return _compare(args)
