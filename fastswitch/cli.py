"""The `fastswitch` command. Bad input ends with a one-line message and exit code 2."""

import argparse
import contextlib
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
from fastswitch.server.replicas import ROUTER_POLICIES

CORE_DEATH_EXIT_DELAY_S = 2.0
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
                      help="tiny: a few MB, for tests; 0.5b: Qwen2-0.5B's shape; 8b: Llama-3-8B's (default: tiny)")
    demo.add_argument("--seed", type=int, default=0, help="weights seed (default: 0)")
    demo.add_argument("--weights", action=argparse.BooleanOptionalAction, default=True,
                      help="write the safetensors; --no-weights: the shape alone, to serve with --load-format dummy")
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
    _server_args(serve)
    serve.set_defaults(func=_serve)

    replicas = commands.add_parser(
        "replicas", help="run N servers behind a router (SMG)",
        description="Start N 'fastswitch serve' replicas on the ports after --port, each with its own share of the "
                    "machine (CPU cores, or a CUDA device) and the same engine options (KV budgets are per replica), "
                    "then the SMG router on --port in front of them (pip install 'fastswitch[router]').")
    replicas.add_argument("--num", type=int, default=2, help="replicas (default: 2)")
    replicas.add_argument("--router", default="smg", choices=["smg"], help="the router (default: smg)")
    replicas.add_argument("--router-policy", default="consistent_hashing", choices=list(ROUTER_POLICIES),
                          help="how the router picks a replica; consistent_hashing keeps a routing key (the "
                               "X-SMG-Routing-Key header) on one replica, so a conversation's history stays where its "
                               "KV is (default: consistent_hashing)")
    replicas.add_argument("--router-arg", action="append", default=[],
                          help="an extra argument for the router, e.g. --router-arg=--log-level=info; repeatable")
    _server_args(replicas)
    replicas.set_defaults(func=_replicas)

    ranks = commands.add_parser(
        "ranks", help="run this node's tensor-parallel ranks for an engine on node 0",
        description="With --nnodes N > 1: on node K (1 to N - 1), start its tensor_parallel_size / N ranks, which "
                    "meet the engine on node 0 (started with the same options and --node-rank 0) at "
                    "--dist-init-addr; returns when they end (0), or when one fails (1).")
    EngineConfig.add_cli_args(ranks)
    ranks.set_defaults(func=_ranks)

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
    swap.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                      help="those models' weights: 'dummy' for a shape alone (default: auto)")
    swap.set_defaults(func=_bench_swap)
    _bench_run_parser(benches)
    compare = benches.add_parser("compare", help="compare runs: a markdown table and plots",
                                 description="Print a markdown table of the runs' figures (ratios against the first "
                                             "run) and write compare.md, ttft_cdf.png, tail_latency.png and "
                                             "swap_bytes.png.")
    compare.add_argument("dirs", nargs="+", help="folders that 'bench run --out' wrote; the first is the reference")
    compare.add_argument("--out", help="folder for the table and plots (default: the first folder's parent)")
    compare.set_defaults(func=_bench_compare)
    _sim_parser(commands)
    return parser


def _bench_run_parser(benches) -> None:
    run = benches.add_parser(
        "run", help="the multi-turn conversation benchmark, offline or over HTTP",
        description="Run a multi-turn conversation workload (synthetic ShareGPT-like, or a ShareGPT JSON file) "
                    "under changing priorities, and write DIR/results.json: a summary (TTFT, TBT, throughput, "
                    "goodput, preemptions, swap traffic, reuse, stall), every request's record, and the "
                    "configuration. The preset sets the context-switching mechanisms; other engine options are yours.")
    run.add_argument("--mode", default="offline", choices=["offline", "http"],
                     help="offline: drive the engine in this process; http: stream from a server (default: offline)")
    run.add_argument("--url", help="http mode: an OpenAI-compatible server's /v1 URL (default: start 'fastswitch "
                                   "serve' with the preset)")
    run.add_argument("--request-timeout", type=float, metavar="SECONDS",
                     help="http mode: a turn not streamed in full this long after its first send is abandoned and "
                          "its conversation ends (default: none)")
    run.add_argument("--text-prompts", action="store_true",
                     help="http mode: send each prompt as text (the model's tokenizer decodes the history), for "
                          "routers that take no token-id prompts, such as SMG")
    from fastswitch.bench.runner import ROUTING_KEYS

    run.add_argument("--routing-key", default="conversation", choices=ROUTING_KEYS,
                     help="http mode: what each request's X-SMG-Routing-Key names, for a router's consistent "
                          "hashing or sticky sessions: its conversation (history stays on one replica) or its "
                          "user (all of a user's conversations on one replica) (default: conversation)")
    run.add_argument("--max-retries", type=int, default=2,
                     help="http mode: times a turn refused with HTTP 429 is sent again once its Retry-After has "
                          "passed, as the OpenAI SDK does; then its conversation ends (default: 2)")
    _run_args(run, "how priorities change: offline, per iteration (trace policy, --trace-update-freq); over HTTP, "
                   "per request, ranked by --policy priority (or slo or vtc, if given); none: the engine's --policy "
                   "decides (default: markov)")
    run.set_defaults(func=_bench_run)


def _sim_parser(commands) -> None:
    from fastswitch.sim.profiles import HARDWARE, LINKS, SHAPES

    sim = commands.add_parser(
        "sim", help="simulate a benchmark run: the real scheduler and KV manager on a modeled device",
        description="Run 'bench run --mode offline' in simulated time: the engine's own scheduler, policies, "
                    "allocators and KV manager, with a cost model of the device for each iteration and of the host "
                    "link for each swap. Writes the same DIR/results.json (mode 'sim'). --model is a built-in shape "
                    f"({', '.join(SHAPES)}) or a model folder (its config.json is enough); default: with a profile "
                    "that 'sim calibrate' wrote, the model it measured, in the dtype it ran unless --dtype is given, "
                    "and for a CPU profile the CPU engine's 1 GiB KV pool unless a pool size is given (what 'bench "
                    "run' takes there); with a built-in profile, llama3-8b. 'fastswitch sim calibrate' measures this "
                    "machine into a profile.")
    _run_args(sim, "how priorities change per iteration (trace policy, --trace-update-freq); none: the engine's "
                   "--policy decides (default: markov)", out_required=False)
    sim.add_argument("--profile", default="a10", help=f"hardware: {', '.join(HARDWARE)}, or a profile file that "
                                                      "'sim calibrate' wrote (default: a10)")
    sim.add_argument("--link", choices=list(LINKS), help="the host link instead of the profile's: pcie4 (25 GB/s each "
                                                         "way) or pcie5 (50 GB/s)")
    sim.set_defaults(func=_sim)
    tools = sim.add_subparsers(metavar="calibrate")
    calibrate = tools.add_parser(
        "calibrate", help="measure this machine's engine into a hardware profile",
        description="Time the real engine on this machine (iterations of many batch shapes: prefill chunks, decode "
                    "batches over short and long contexts) and its swap manager (copies of many sizes, both modes), "
                    "fit the simulator's cost model to them, and measure this machine's peaks (memory read, matmul "
                    "and memcpy bandwidth) to state the fit as peak x efficiency; write the profile as JSON for "
                    "'fastswitch sim --profile FILE', which takes the model, dtype and device it records unless "
                    "given others.")
    calibrate.add_argument("--out", required=True, help="profile file to write (JSON)")
    calibrate.add_argument("--name", help="the profile's name (default: calibrated-HOSTNAME)")
    EngineConfig.add_cli_args(calibrate)
    calibrate.set_defaults(func=_sim_calibrate)


def _run_args(parser, priorities_help: str, out_required: bool = True) -> None:
    """What `bench run` and `sim` share: preset, output, priorities, workload and the engine options."""
    from fastswitch.bench.runner import PRESETS, PRIORITY_PATTERNS
    from fastswitch.bench.workload import SyntheticSpec

    parser.add_argument("--preset", default="fastswitch", choices=list(PRESETS),
                        help="baseline: vLLM V0-style swaps; fastswitch: everything on; fastswitch-groups/-async/"
                             "-reuse: that mechanism off; recompute: preempt by recomputation; vllm-v1, sglang: as "
                             "those engines preempt and offload (docs/baselines.md) (default: fastswitch)")
    parser.add_argument("--out", required=out_required, help="folder to write results.json to")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.add_argument("--label", help="the run's name in comparisons (default: the preset; 'server' with --url)")
    parser.add_argument("--priorities", default="markov", choices=PRIORITY_PATTERNS, help=priorities_help)
    work = parser.add_argument_group("workload")
    spec = SyntheticSpec()
    work.add_argument("--workload", default="synthetic", help="'synthetic', or a ShareGPT-format JSON file")
    work.add_argument("--conversations", type=int, default=spec.conversations, help=f"(default: {spec.conversations})")
    work.add_argument("--rate", type=float, default=spec.rate, help=f"conversations per second (default: {spec.rate})")
    work.add_argument("--input-mean", type=float, default=spec.input_mean,
                      help=f"synthetic: mean tokens per user message (default: {spec.input_mean})")
    work.add_argument("--output-mean", type=float, default=spec.output_mean,
                      help=f"synthetic: mean tokens per reply (default: {spec.output_mean})")
    work.add_argument("--think-mean", type=float, default=spec.think_mean_s,
                      help=f"mean seconds between a reply and the next turn (default: {spec.think_mean_s})")
    work.add_argument("--max-context", type=int, default=2048, help="tokens a conversation may reach (default: 2048)")
    work.add_argument("--users", type=int, default=spec.users, help=f"(default: {spec.users})")
    work.add_argument("--workload-seed", type=int, default=0, help="(default: 0)")
    EngineConfig.add_cli_args(parser)


def _demo_model(args) -> int:
    path = write_demo_model(args.dir, arch=args.arch, size=args.size, seed=args.seed, weights=args.weights)
    print(f"wrote {args.arch} {args.size} demo model to {path}")
    return 0


def _server_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    parser.add_argument("--served-model-name", help="model name clients send (default: the model folder's name)")
    parser.add_argument("--api-key", default=os.environ.get("FASTSWITCH_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1 (default: $FASTSWITCH_API_KEY, else none)")
    parser.add_argument("--max-queue", type=int, default=1024,
                        help="requests waiting to start, beyond which new ones get HTTP 429 (default: 1024)")
    parser.add_argument("--max-request-bytes", type=int, default=1 << 20,
                        help="request bodies larger than this get HTTP 413 (default: 1 MiB)")
    parser.add_argument("--shutdown-timeout", type=float, default=30.0,
                        help="on SIGTERM/SIGINT, seconds to let requests in flight finish (default: 30)")
    EngineConfig.add_cli_args(parser)


SERVER_ONLY = ("served_model_name", "api_key", "max_queue", "max_request_bytes", "shutdown_timeout")


def _replicas(args) -> int:
    from fastswitch.server import replicas

    config = EngineConfig.from_cli_args(args)
    serve_args = config.to_cli_args()
    for name in SERVER_ONLY:
        if getattr(args, name) is not None:
            serve_args += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    return replicas.run(config, serve_args, args.num, args.router_policy, args.host, args.port, args.router_arg,
                        args.log_level)


def _ranks(args) -> int:
    from fastswitch.executor.multiproc import serve_node

    config = EngineConfig.from_cli_args(args)
    if config.node_rank == 0:
        raise ValueError("fastswitch ranks runs the ranks of nodes 1 to nnodes - 1 (--nnodes, --node-rank, "
                         "--dist-init-addr); node 0 runs the engine itself (fastswitch serve, with --node-rank 0)")
    return serve_node(config)


def _serve(args) -> int:
    import asyncio

    import uvicorn

    from fastswitch.server.app import ServerConfig, build_app
    from fastswitch.server.core_client import EngineCoreClient

    for name in ("port", "max_queue", "max_request_bytes"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer")
    config = EngineConfig.from_cli_args(args)
    if (cores := config.cpu_set()) is not None:
        os.sched_setaffinity(0, cores)  # the API server too, and the engine core it starts (which sets its threads)
    engine = EngineCoreClient(config, args.log_level)  # returns once the core has loaded the model
    name = args.served_model_name or Path(config.model or default_model_path()).name

    def on_core_death():  # answer 503 for a moment (clients and probes see why), then exit non-zero
        asyncio.get_running_loop().call_later(CORE_DEATH_EXIT_DELAY_S, setattr, server, "should_exit", True)

    app = build_app(engine, ServerConfig(name, args.api_key, args.max_queue, args.max_request_bytes), on_core_death)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           timeout_graceful_shutdown=args.shutdown_timeout))
    print(f"serving {name!r} on http://{args.host}:{args.port}/v1", flush=True)
    for sig in (signal.SIGTERM, signal.SIGINT):  # uvicorn re-raises the signal once it has shut down gracefully:
        signal.signal(sig, lambda *_: None)  # by then it is handled, and the exit code should say so (0)
    try:
        server.run()  # returns after SIGTERM/SIGINT, once requests in flight are done or the deadline passed
    finally:
        engine.shutdown()
    return 1 if engine.dead else 0


def _bench_swap(args) -> int:
    from fastswitch.bench.swap_bench import SHAPES, run

    models = args.models.split(",")
    if unknown := [m for m in models if m not in SHAPES]:
        raise ValueError(f"unknown model shape {unknown[0]!r}; choose from {', '.join(SHAPES)}")
    tokens = [int(t) for t in args.tokens.split(",")]
    interference = [] if args.interference_models == "none" else [
        str(default_model_path()) if m == "default" else m for m in args.interference_models.split(",")]
    run(models, tokens, args.device, args.dtype, args.block_size, args.repeats, args.json, args.plot, interference,
        args.load_format)
    return 0


def _bench_run(args) -> int:
    import asyncio

    from fastswitch.bench import runner
    from fastswitch.engine.engine import Engine
    from fastswitch.model.config import ModelConfig
    from fastswitch.model.tokenizer import Tokenizer

    if args.url and args.mode != "http":
        raise ValueError("--url needs --mode http")
    if args.max_retries < 0 or args.request_timeout is not None and not args.request_timeout > 0:
        raise ValueError("--max-retries must be at least 0 and --request-timeout positive")
    config = _run_config(args, offline=args.mode == "offline")
    path = config.model or default_model_path()
    max_position = config.max_model_len or ModelConfig.from_folder(path, need_weights=False).max_position_embeddings
    conversations = _workload(args, max_position, path)
    label = args.label or ("server" if args.url else args.preset)
    _announce(label, conversations, args.mode)
    if args.mode == "offline":
        engine = Engine(config)
        records, duration, counters = _offline(engine, conversations, args.progress)
    else:
        with contextlib.nullcontext(args.url) if args.url else runner.fastswitch_server(config) as url:
            before = runner.server_counters(url)
            text = Tokenizer(path) if args.text_prompts else None
            records, duration = asyncio.run(runner.run_http(url, conversations, args.priorities, config.trace_levels,
                                                            args.workload_seed, args.progress, args.request_timeout,
                                                            args.max_retries, text, args.routing_key))
            after = runner.server_counters(url)
        counters = {k: None if v is None else v - (before[k] or 0) for k, v in after.items()}
    _write_results(args, label, config, records, duration, counters,
                   {"preset": None if args.url else args.preset, "mode": args.mode, "url": args.url})
    return 0


def _sim(args) -> int:
    from fastswitch.model.tokenizer import Tokenizer
    from fastswitch.sim.profiles import load_hardware, load_shape, sim_defaults
    from fastswitch.sim.simulator import simulated_engine

    if args.out is None:
        raise ValueError("fastswitch sim: --out is required")
    config, model = sim_defaults(_run_config(args, offline=True), args.profile)  # a calibrated profile's model
    shape, hardware = load_shape(model, config.dtype), load_hardware(args.profile)
    hardware = hardware.with_link(args.link) if args.link else hardware
    tokenizer = Path(model) if (Path(model) / "tokenizer.json").is_file() else default_model_path()  # else the demo's
    conversations = _workload(args, min(config.max_model_len or shape.max_position_embeddings,
                                        shape.max_position_embeddings), tokenizer)
    label = args.label or args.preset
    _announce(label, conversations, f"simulated: {shape.name} on {hardware.name}")
    engine = simulated_engine(config, shape, hardware, Tokenizer(tokenizer))
    records, duration, counters = _offline(engine, conversations, args.progress)
    _write_results(args, label, config, records, duration, counters,
                   {"preset": args.preset, "mode": "sim", "profile": hardware.to_json(), "model_shape": shape.name,
                    "engine": engine.core.description})
    return 0


def _sim_calibrate(args) -> int:
    import json
    import platform

    from fastswitch.sim.calibrate import calibrate, report

    profile = calibrate(EngineConfig.from_cli_args(args), args.name or f"calibrated-{platform.node()}")
    Path(args.out).write_text(json.dumps(profile, indent=1))
    print("\n".join(report(profile["measured"])))
    print(f"wrote {args.out}: {', '.join(f'{k}={v:.3g}' for k, v in profile.items() if isinstance(v, float))}")
    return 0


def _run_config(args, offline: bool) -> EngineConfig:
    """The engine options with the preset's, and the policy the priority pattern needs."""
    import dataclasses

    from fastswitch.bench.runner import PRESETS

    for name in ("conversations", "rate", "input_mean", "output_mean", "max_context", "users"):
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive")
    config = dataclasses.replace(EngineConfig.from_cli_args(args), **PRESETS[args.preset])
    if args.priorities != "none" and offline:  # the engine re-draws priorities
        return dataclasses.replace(config, policy="trace", trace_pattern=args.priorities)
    if args.priorities != "none" and config.policy in ("fcfs", "trace"):  # the client sends them; rank by them
        return dataclasses.replace(config, policy="priority")
    return config


def _announce(label: str, conversations, mode: str) -> None:
    print(f"{label}: {len(conversations)} conversations, {sum(len(c.turns) for c in conversations)} requests, "
          f"{mode}", flush=True)


def _offline(engine, conversations, progress: bool = True):
    """Records, duration and the counters' change over the run."""
    from fastswitch.bench import runner

    before = runner.engine_counters(engine.stats)
    records, duration = runner.run_offline(engine, conversations, progress)
    return records, duration, {k: v - before[k] for k, v in runner.engine_counters(engine.stats).items()}


def _write_results(args, label: str, config: EngineConfig, records, duration: float, counters: dict,
                   run: dict) -> None:
    import dataclasses

    from fastswitch.bench import machine, report

    summary = report.summarize(records, duration, counters, config.slo())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"label": label, **run, "command": "fastswitch " + " ".join(sys.argv[1:]),
               "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine.describe(), "config": None if run.get("url") else dataclasses.asdict(config),
               "workload": {k: v for k, v in vars(args).items() if k in _WORKLOAD_ARGS}, "summary": summary}
    report.write(out, results, records)
    print(report.table([results]))
    print(f"wrote {out / 'results.json'}")


_WORKLOAD_ARGS = ("workload", "conversations", "rate", "input_mean", "output_mean", "think_mean", "max_context",
                  "users", "workload_seed", "priorities", "slo_ttft", "slo_tbt", "request_timeout", "max_retries")


def _workload(args, max_position: int, tokenizer_folder: str | Path):
    """The conversations: synthetic, or a ShareGPT file tokenized by the folder's tokenizer."""
    from fastswitch.bench import workload
    from fastswitch.model.tokenizer import Tokenizer

    max_context = min(args.max_context, max_position)
    if args.workload != "synthetic":
        if not Path(args.workload).is_file():
            raise ValueError(f"--workload: {args.workload!r} is neither 'synthetic' nor a file")
        return workload.load_sharegpt(args.workload, Tokenizer(tokenizer_folder), args.rate, args.workload_seed,
                                      args.conversations, max_context=max_context, users=args.users)
    return workload.synthetic(workload.SyntheticSpec(
        conversations=args.conversations, rate=args.rate, input_mean=args.input_mean, output_mean=args.output_mean,
        think_mean_s=args.think_mean, max_context=max_context, users=args.users, seed=args.workload_seed))


def _bench_compare(args) -> int:
    from fastswitch.bench import report

    runs = [report.load(d) for d in args.dirs]
    out = Path(args.out or Path(args.dirs[0]).resolve().parent)
    out.mkdir(parents=True, exist_ok=True)
    text = report.table(runs)
    (out / "compare.md").write_text(text + "\n")
    print(text)
    for path in report.plot(runs, out):
        print(f"wrote {path}")
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
