"""`dsv4 serve`: the OpenAI- and Anthropic-compatible HTTP server.

    dsv4 serve                                   # the bundled dsv4-tiny on 127.0.0.1:8000
    dsv4 serve --model /models/DeepSeek-V4-Flash --device cuda --host 0.0.0.0 --api-key KEY
"""

from __future__ import annotations

import argparse

from dsv4.server.config import API_KEY_ENV, BUNDLED_MODEL, ServerArgs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = ServerArgs.__dataclass_fields__
    parser.add_argument("--model", default=str(BUNDLED_MODEL),
                        help="V4 checkpoint folder (default: the bundled dsv4-tiny)")
    parser.add_argument("--host", default=d["host"].default)
    parser.add_argument("--port", type=int, default=d["port"].default)
    parser.add_argument("--api-key", default=None,
                        help=f"required on every /v1 route (default: ${API_KEY_ENV}, else none)")
    parser.add_argument("--served-model-name", nargs="+", default=None, dest="served_model_names",
                        help="names clients use in `model` (default: the folder's name)")
    parser.add_argument("--device", default=None, help="cpu, cuda or npu (default: the best)")
    parser.add_argument("--dtype", default=None,
                        help="bf16, fp16 or fp32 (default: bf16, or fp32 on a CPU without "
                        "bf16 matmuls)")
    parser.add_argument("--kv-cache-dtype", default=d["kv_cache_dtype"].default,
                        help="bf16 or fp8")
    parser.add_argument("--max-num-seqs", type=int, default=d["max_num_seqs"].default,
                        help="sequences generated at once")
    parser.add_argument("--max-num-batched-tokens", type=int,
                        default=d["max_num_batched_tokens"].default, help="tokens per step")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="longest prompt + output (default: the model's)")
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=None,
                        help="KV-cache budget in bytes (default: 1 GiB)")
    parser.add_argument("--num-speculative-tokens", type=int,
                        default=d["num_speculative_tokens"].default,
                        help="1: decode with the model's MTP layer as drafter (same outputs, "
                             "up to 2 tokens per step); 0: off")
    parser.add_argument("--compile", action="store_true",
                        help="compile the decode step at start-up (CPU; a minute or more the "
                             "first time, cached on disk), for about 2x faster tokens")
    parser.add_argument("--max-queue", type=int, default=d["max_queue"].default,
                        help="sequences that may wait beyond --max-num-seqs before 429")
    parser.add_argument("--shutdown-timeout", type=float, default=d["shutdown_timeout_s"].default,
                        dest="shutdown_timeout_s",
                        help="seconds in-flight requests get to finish on shutdown")
    parser.add_argument("--max-request-bytes", type=int,
                        default=d["max_request_bytes"].default,
                        help="largest request body accepted; larger ones get 413")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch.set_num_threads (default on the CPU: one fewer than the cores, "
                             "leaving one to the HTTP side)")
    parser.add_argument("--log-level", default=d["log_level"].default)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from dsv4.server.app import create_app

    server_args = ServerArgs(**vars(args))
    if server_args.compile:
        print("dsv4 serve: compiling the decode step (a minute or more the first time on a "
              "CPU)...", flush=True)
    app = create_app(server_args)
    print(f"dsv4 serve: {server_args.served_model_names[0]} from {server_args.model} on "
          f"http://{server_args.host}:{server_args.port} (OpenAI /v1/chat/completions, "
          "/v1/completions; Anthropic /v1/messages)", flush=True)
    uvicorn.run(app, host=server_args.host, port=server_args.port,
                log_level=server_args.log_level,
                timeout_graceful_shutdown=int(server_args.shutdown_timeout_s + 0.999))
    return 0
