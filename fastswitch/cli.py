"""The `fastswitch` command. Bad input ends with a one-line message and exit code 2."""

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path

from fastswitch.config import EngineConfig
from fastswitch.llm import LLM
from fastswitch.model.config import ModelError
from fastswitch.model.demo import ARCHS, SIZES, default_model_path, write_demo_model
from fastswitch.sampling import SamplingParams

DEMO_PROMPTS = [
    "The quick brown fox",
    "Return the number of items in a container.",
    [{"role": "user", "content": "What does a context switch cost?"}],
]


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, ModelError, MemoryError) as error:
        parser.exit(2, f"fastswitch: error: {error}\n")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastswitch", description="FastSwitch LLM serving engine.")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    demo = commands.add_parser("demo-model", help="write a random-weight demo model folder",
                               description="Write a deterministic random-weight model in Hugging Face format, "
                                           "with FastSwitch's tokenizer and a chat template.")
    demo.add_argument("dir", help="folder to write (created if missing)")
    demo.add_argument("--arch", default="llama", choices=list(ARCHS), help="architecture (default: llama)")
    demo.add_argument("--size", default="tiny", choices=list(SIZES),
                      help="tiny: a few MB, for tests; 0.5b: Qwen2-0.5B's shape (default: tiny)")
    demo.add_argument("--seed", type=int, default=0, help="weights seed (default: 0)")
    demo.set_defaults(func=_demo_model)

    gen = commands.add_parser("generate", help="generate completions offline",
                              description="Generate completions for the given prompts (or a few demo prompts).")
    gen.add_argument("--prompt", action="append", help="a prompt; repeat for several (default: demo prompts)")
    gen.add_argument("--chat", action="store_true", help="send each prompt as a user message through the chat template")
    sampling = gen.add_argument_group("sampling")
    sampling.add_argument("--max-tokens", type=int, default=32, help="tokens to generate at most (default: 32)")
    sampling.add_argument("--min-tokens", type=int, default=0, help="tokens to generate before EOS or stop counts")
    sampling.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: 0)")
    sampling.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1)")
    sampling.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens; 0: all")
    sampling.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability")
    sampling.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats")
    sampling.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI presence penalty")
    sampling.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI frequency penalty")
    sampling.add_argument("--stop", action="append", default=[], help="stop string; repeat for several")
    sampling.add_argument("--ignore-eos", action="store_true", help="keep generating past EOS")
    EngineConfig.add_cli_args(gen)
    gen.set_defaults(func=_generate)

    serve = commands.add_parser("serve", help="run the OpenAI-compatible server",
                                description="Serve a model over the OpenAI API (/v1/completions, /v1/chat/completions, "
                                            "/v1/models) with /health, /version and Prometheus /metrics.")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    serve.add_argument("--served-model-name", help="model name clients send (default: the model folder's name)")
    serve.add_argument("--api-key", default=os.environ.get("FASTSWITCH_API_KEY"),
                       help="require 'Authorization: Bearer KEY' on /v1 (default: $FASTSWITCH_API_KEY, else none)")
    serve.add_argument("--max-queue", type=int, default=1024,
                       help="requests waiting to start, beyond which new ones get HTTP 429 (default: 1024)")
    serve.add_argument("--max-request-bytes", type=int, default=1 << 20,
                       help="request bodies larger than this get HTTP 413 (default: 1 MiB)")
    serve.add_argument("--shutdown-timeout", type=float, default=30.0,
                       help="on SIGTERM/SIGINT, seconds to let requests in flight finish (default: 30)")
    EngineConfig.add_cli_args(serve)
    serve.set_defaults(func=_serve)

    bench = commands.add_parser("bench", help="benchmarks", description="Benchmarks; results go to stdout and files.")
    benches = bench.add_subparsers(required=True, metavar="BENCHMARK")
    swap = benches.add_parser("swap", help="cost of a context switch against the single-copy floor",
                              description="Time swap-out + swap-in of one request in baseline and fastswitch mode "
                                          "against one plain copy of the same bytes, then the slowdown of a decoding "
                                          "batch while another request swaps in the background.")
    swap.add_argument("--models", default="tiny,0.5b", help="KV shapes of these demo models (default: tiny,0.5b)")
    swap.add_argument("--tokens", default="256,1024,4096,16384", help="request lengths (default: 256,1024,4096,16384)")
    swap.add_argument("--device", default="cpu", help="device holding the KV pool (default: cpu)")
    swap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    swap.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default: 16)")
    swap.add_argument("--repeats", type=int, default=5, help="round trips per measurement; the median counts")
    swap.add_argument("--json", help="write one row per measurement to this file")
    swap.add_argument("--plot", help="write a PNG of time against request length to this file")
    swap.add_argument("--interference-models", default="default",
                      help="model folders (comma-separated) for the background-swap slowdown run; 'default': the "
                           "tiny demo model; 'none': skip it")
    swap.set_defaults(func=_bench_swap)
    return parser


def _demo_model(args) -> int:
    path = write_demo_model(args.dir, arch=args.arch, size=args.size, seed=args.seed)
    print(f"wrote {args.arch} {args.size} demo model to {path}")
    return 0


def _serve(args) -> int:
    import uvicorn

    from fastswitch.engine.engine import Engine
    from fastswitch.server.app import ServerConfig, build_app
    from fastswitch.server.async_engine import AsyncEngine

    for name in ("port", "max_queue", "max_request_bytes"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer")
    config = EngineConfig.from_cli_args(args)
    engine = AsyncEngine(Engine(config))
    name = args.served_model_name or Path(config.model or default_model_path()).name
    app = build_app(engine, ServerConfig(name, args.api_key, args.max_queue, args.max_request_bytes))
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           timeout_graceful_shutdown=args.shutdown_timeout))
    print(f"serving {name!r} on http://{args.host}:{args.port}/v1", flush=True)
    for sig in (signal.SIGTERM, signal.SIGINT):  # uvicorn re-raises the signal once it has shut down gracefully:
        signal.signal(sig, lambda *_: None)  # by then it is handled, and the exit code should say so (0)
    try:
        server.run()  # returns after SIGTERM/SIGINT, once requests in flight are done or the deadline passed
    finally:
        engine.shutdown()
    return 0


def _bench_swap(args) -> int:
    from fastswitch.bench.swap_bench import SHAPES, run

    models = args.models.split(",")
    if unknown := [m for m in models if m not in SHAPES]:
        raise ValueError(f"unknown model shape {unknown[0]!r}; choose from {', '.join(SHAPES)}")
    tokens = [int(t) for t in args.tokens.split(",")]
    interference = [] if args.interference_models == "none" else [
        str(default_model_path()) if m == "default" else m for m in args.interference_models.split(",")]
    run(models, tokens, args.device, args.dtype, args.block_size, args.repeats, args.json, args.plot, interference)
    return 0


def _generate(args) -> int:
    params = SamplingParams(
        max_tokens=args.max_tokens, min_tokens=args.min_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty, stop=args.stop,
        ignore_eos=args.ignore_eos,
    )
    prompts = args.prompt or DEMO_PROMPTS
    if args.chat:
        prompts = [[{"role": "user", "content": p}] if isinstance(p, str) else p for p in prompts]
    llm = LLM(**vars(EngineConfig.from_cli_args(args)))
    start = time.monotonic()
    outputs = llm.generate(prompts, params)
    elapsed = time.monotonic() - start
    for prompt, out in zip(prompts, outputs):
        print(f"--- prompt: {prompt!r}\n{out.text!r}  [{len(out.token_ids)} tokens, {out.finish_reason}]")
    total = sum(len(o.token_ids) for o in outputs)
    print(f"--- {len(outputs)} requests, {total} tokens in {elapsed:.2f} s ({total / elapsed:.1f} tok/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
