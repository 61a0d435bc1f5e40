#!/usr/bin/env bash
# Issue 14's device checks in one call on a lent H100/H200, in at most 8.5 minutes (each step has a time
# limit); everything under $OUT: summary.md (the tables, short) and gpu_check.tar.gz (logs, JSON, plots).
#
#   run(command="bash benchmarks/gpu/check.sh", carry=[".whl"], timeout_s=540)
#
# The device image has torch, triton, transformers, tokenizers and safetensors but not msgspec: carry its
# wheel in .whl (cp312 manylinux; the README's "GPU" section says how). In order:
#   1. the GPU tests (tests/test_gpu.py: greedy fp32 identity with transformers on CUDA for every
#      architecture, torch / triton eager / triton with CUDA graphs, with preemption; the compiled kernel
#      against a float64 reference; pinned host tier; one host sync per sampling step; the KV budget);
#   2. decode tok/s at batch 1, 8, 64, 256 and prefill tok/s on a Llama-3-8B-shaped random bf16 model,
#      against the floors (bytes over the measured copy bandwidth; FLOPs over the measured matmul rate);
#   3. `fastswitch bench swap` on the 8B KV shape (GB/s against one pinned copy; a decoding batch's
#      slowdown while another request swaps);
#   4. `fastswitch bench run` baseline vs fastswitch on the 8B shape, KV tight enough to preempt constantly.
# DRY_RUN=1: the same steps on this CPU at tiny shapes (the GPU tests skip), to check the script itself.
# CONVERSATIONS, RATE and KV_BYTES size step 4.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/fastswitch-gpu-check}
work=$(mktemp -d)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
if [ "${DRY_RUN:-0}" = 1 ]; then
    device=cpu size=tiny backend=auto dtype=float32 batches=1,8 prefill=2x256 tokens=256,1024 kv=${KV_BYTES:-12000000}
    conversations=${CONVERSATIONS:-12} rate=${RATE:-4}
else
    device=cuda size=8b backend=triton dtype=bfloat16 batches=1,8,64,256 prefill=8x1024 tokens=256,1024,4096,16384
    kv=${KV_BYTES:-1610612736} conversations=${CONVERSATIONS:-120} rate=${RATE:-4}
fi
shape="$work/llama-$size"
step() {  # step NAME SECONDS COMMAND...: its output to $work/NAME.log, a line in the summary
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" >"$work/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$work/$name.log"
    echo "- $name: exit $rc in $((SECONDS - start)) s" >>"$work/steps.md"
}

{ nvidia-smi || true; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
    >"$work/env.txt" 2>&1
python3 -m fastswitch demo-model "$shape" --size "$size" --no-weights >/dev/null
step tests 150 python3 -m pytest -m gpu tests/test_gpu.py -q --maxfail=5 -p no:cacheprovider
step decode 90 python3 benchmarks/gpu/decode.py "$shape" --out "$work/decode.json" --device "$device" \
    --attention-backend "$backend" --dtype "$dtype" --batches "$batches" --prefill "$prefill"
step swap 60 python3 -m fastswitch bench swap --device "$device" --models "$size" --tokens "$tokens" \
    --dtype "$dtype" --json "$work/swap.json" --plot "$work/swap.png" --interference-models "$shape" \
    --load-format dummy
for preset in baseline fastswitch; do
    step "run-$preset" 90 python3 -m fastswitch bench run --preset "$preset" --model "$shape" --load-format dummy \
        --device "$device" --dtype "$dtype" --attention-backend "$backend" --kv-cache-memory-bytes "$kv" \
        --swap-space 16 --conversations "$conversations" --rate "$rate" --out "$work/$preset"
done
step compare 20 python3 -m fastswitch bench compare "$work/baseline" "$work/fastswitch" --out "$work/compare"

mkdir -p "$OUT"
{
    echo "# GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
    head -n 12 "$work/env.txt"
    echo; cat "$work/steps.md"
    echo; echo "## tests"; tail -n 5 "$work/tests.log"
    echo; echo "## decode and prefill"; grep '^|' "$work/decode.log"
    echo; echo "## swap"; grep -E '^\||slowdown' "$work/swap.log"
    echo; echo "## bench run"; cat "$work/compare/compare.md" 2>/dev/null
} >"$OUT/summary.md"
tar -czf "$OUT/gpu_check.tar.gz" -C "$work" --exclude='./llama-*' .
cat "$OUT/summary.md"
