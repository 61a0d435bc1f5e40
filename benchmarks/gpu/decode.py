"""Decode and prefill speed of a model's shape through the engine, against the memory and arithmetic floors.

    python benchmarks/gpu/decode.py MODEL_DIR --out decode.json [--batches 1,8,64,256] [--context 512]

A decode step must read every weight once and each sequence's KV once: its floor is those bytes over
the device's copy bandwidth (measured here: a large device-to-device copy, bytes read plus written).
A prefill must do 2 x parameters FLOPs per token: its floor is that over the measured bf16 matmul
rate. Steps are timed through `Engine.step()` (scheduler, sampler and all), after warm-up.
"""

import argparse
import json
import logging
import random
import statistics
import time

import torch

from fastswitch.config import EngineConfig
from fastswitch.engine.engine import Engine
from fastswitch.sampling import SamplingParams


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, work, repeats: int) -> float:
    """Median seconds of `work` after one warm-up run."""
    work()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        work()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ceilings(device: torch.device, dtype: torch.dtype) -> dict:
    n = (1 << 30) if device.type == "cuda" else (1 << 24)
    src, dst = torch.randn(n // 2, device=device, dtype=dtype), torch.empty(n // 2, device=device, dtype=dtype)
    copy_s = timed(device, lambda: dst.copy_(src), 10)
    m = 8192 if device.type == "cuda" else 512
    a, b = torch.randn(m, m, device=device, dtype=dtype), torch.randn(m, m, device=device, dtype=dtype)
    matmul_s = timed(device, lambda: a @ b, 10)
    return {"copy_bytes_per_s": 2 * src.numel() * src.element_size() / copy_s, "matmul_flop_per_s": 2 * m**3 / matmul_s}


def decode(engine: Engine, batch: int, context: int, steps: int, device: torch.device) -> float:
    """Seconds per decode step of `batch` sequences `context` tokens long (median of `steps`)."""
    params = SamplingParams(temperature=0, max_tokens=steps + 64, ignore_eos=True)
    ids = [engine.add_request([random.randrange(3, 4000) for _ in range(context)], params) for _ in range(batch)]
    while len(engine.step()) < batch:  # prefills, until every sequence decodes
        pass
    for _ in range(3):
        engine.step()
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        assert len(engine.step()) == batch
        times.append(time.perf_counter() - start)
    for request_id in ids:
        engine.abort(request_id)
    return statistics.median(times)


def prefill(engine: Engine, prompts: int, length: int, device: torch.device) -> float:
    """Seconds to prefill `prompts` prompts of `length` tokens (one token each after)."""
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    sync(device)
    start = time.perf_counter()
    for _ in range(prompts):
        engine.add_request([random.randrange(3, 4000) for _ in range(length)], params)
    while engine.has_unfinished_requests():
        engine.step()
    sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--out", required=True)
    parser.add_argument("--load-format", default="dummy")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--attention-backend", default="triton")
    parser.add_argument("--batches", default="1,8,64,256")
    parser.add_argument("--context", type=int, default=512, help="tokens in each sequence's KV when timed")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--prefill", default="8x1024", help="prompts x tokens for the prefill timing")
    parser.add_argument("--enforce-eager", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    batches = [int(b) for b in args.batches.split(",")]
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    limits = ceilings(device, dtype)
    logging.info("ceilings: %.0f GB/s copy, %.0f TFLOP/s matmul", limits["copy_bytes_per_s"] / 1e9,
                 limits["matmul_flop_per_s"] / 1e12)
    prompts, length = (int(x) for x in args.prefill.split("x"))
    engine = Engine(EngineConfig(model=args.model, load_format=args.load_format, dtype=args.dtype, device=args.device,
                                 attention_backend=args.attention_backend, max_num_seqs=max(batches),
                                 max_num_batched_tokens=max(8192, length), enforce_eager=args.enforce_eager,
                                 enable_prefix_caching=False))
    model, cfg = engine.core.executor.runner.model, engine.core.executor.runner.cfg
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_token_bytes = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * dtype.itemsize
    rows = []
    for batch in batches:
        logging.info("decode: batch %d, context %d", batch, args.context)
        seconds = decode(engine, batch, args.context, args.steps, device)
        floor = (weight_bytes + batch * (args.context + args.steps // 2) * kv_token_bytes) / limits["copy_bytes_per_s"]
        rows.append({"phase": "decode", "batch": batch, "context": args.context, "step_s": seconds,
                     "tok_s": batch / seconds, "floor_s": floor, "vs_floor": seconds / floor})
    logging.info("prefill: %d x %d tokens", prompts, length)
    seconds = prefill(engine, prompts, length, device)
    floor = 2 * sum(p.numel() for p in model.parameters()) * prompts * length / limits["matmul_flop_per_s"]
    rows.append({"phase": "prefill", "batch": prompts, "context": length, "step_s": seconds,
                 "tok_s": prompts * length / seconds, "floor_s": floor, "vs_floor": seconds / floor})
    result = {"model": args.model, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "engine": engine.core.description, "weight_bytes": weight_bytes, "kv_bytes_per_token": kv_token_bytes,
              **limits, "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"{result['device']}: {engine.core.description}")
    print("| phase | batch | context | ms | tok/s | floor ms | x floor |\n|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['phase']} | {r['batch']} | {r['context']} | {1000 * r['step_s']:.2f} | {r['tok_s']:.0f} | "
              f"{1000 * r['floor_s']:.2f} | {r['vs_floor']:.2f} |")


if __name__ == "__main__":
    main()
