"""Decode tokens per second of one engine at a fixed batch: the same prompts and lengths for vLLM and FastSwitch.

Run by `vllm_cpu.sh decode` once in vLLM's venv and once in FastSwitch's; prints one JSON line. Greedy,
`--batch` random-token prompts of `--prompt-len`, `--max-tokens` each (EOS ignored), after a warm-up;
tok/s = output tokens / wall time of the generate call (prefill included, short next to the decode).
"""

import argparse
import json
import random
import time


def prompts(batch: int, length: int) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(3, 4000) for _ in range(length)] for _ in range(batch)]


def run_vllm(args) -> float:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=args.model, dtype="bfloat16", max_model_len=args.prompt_len + args.max_tokens + 16,
              kv_cache_memory_bytes=1 << 30)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    batch = [TokensPrompt(prompt_token_ids=p) for p in prompts(args.batch, args.prompt_len)]
    llm.generate(batch[:1], SamplingParams(max_tokens=4), use_tqdm=False)
    start = time.perf_counter()
    outputs = llm.generate(batch, params, use_tqdm=False)
    return sum(len(o.outputs[0].token_ids) for o in outputs) / (time.perf_counter() - start)


def run_fastswitch(args) -> float:
    from fastswitch import LLM, SamplingParams

    llm = LLM(model=args.model, dtype="bfloat16", kv_cache_memory_bytes=1 << 30)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    batch = prompts(args.batch, args.prompt_len)
    llm.generate(batch[:1], SamplingParams(max_tokens=4), use_tqdm=False)
    start = time.perf_counter()
    outputs = llm.generate(batch, params, use_tqdm=False)
    return sum(len(o.token_ids) for o in outputs) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--engine", choices=["vllm", "fastswitch"], required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    tok_s = (run_vllm if args.engine == "vllm" else run_fastswitch)(args)
    print(json.dumps({"engine": args.engine, "batch": args.batch, "prompt_len": args.prompt_len,
                      "max_tokens": args.max_tokens, "tok_s": tok_s}))


if __name__ == "__main__":
    main()
