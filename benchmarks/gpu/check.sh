#!/usr/bin/env bash
# Every device check in one call on a lent H100/H200; everything under $OUT: summary.md (the verdict, each
# step's line, the tables) and gpu_check.tar.gz (logs, JUnit XML, JSON, plots), written whatever fails.
#
#   run(command="bash benchmarks/gpu/check.sh", carry=[".whl"], timeout_s=540)
#
# The device image has torch, triton, transformers, tokenizers and safetensors but not msgspec: carry its
# wheel in .whl (cp312 manylinux; the README's "GPU" section says how). In order, each step with a limit:
#   wheels 10 s, env 15 s (torch/triton versions, nvidia-smi), model 10 s (the 8B shape's config);
#   tests-smoke 60 s: `-m gpu_smoke` in tests/test_gpu.py (greedy fp32 identity with transformers on
#      CUDA for llama with torch / triton eager / triton with CUDA graphs; pinned host tier; one host sync
#      per sampling and decode step): a compile or capture error shows within the first minute;
#   decode 75 s: decode tok/s at batch 1, 8, 64, 256 and prefill tok/s on a Llama-3-8B-shaped random bf16
#      model against the floors (bytes over the measured copy bandwidth; FLOPs over the measured matmul);
#   swap 45 s: `fastswitch bench swap` on the 8B KV shape (GB/s against one pinned copy; a decoding
#      batch's slowdown while another request swaps);
#   run-baseline, run-fastswitch 75 s each: `fastswitch bench run` on the 8B shape, KV tight enough to
#      preempt constantly; compare 15 s;
#   tests-rest: `-m "gpu and not gpu_smoke"` (the compiled kernel against float64, the KV budget, then
#      the other 51 parity engines), limited to what is left until 495 s after the start, so a slow
#      parity matrix cannot eat the benchmarks' time; then pack 10 s.
# Budget: 10+15+10 + 60 + 75+45+75+75+15 = 380 s of fixed limits; a step past its limit gets SIGINT
# (pytest still writes its report), then SIGKILL 5 s later, so at most 9 x 5 = 45 s more: tests-rest gets
# at least 495 - 425 = 70 s, usually far more (steps end before their limits); with its 5 s grace and the
# 10 s pack the script ends by 510 s, 30 s inside the call's 540.
#
# Exit code: 0 only when every step exited 0 and each tests step passed at least one test; 1 when any step
# failed, timed out (timeout's 124, or 137 after SIGKILL) or had no time left, or a tests step passed
# nothing (all skipped: no CUDA); summary.md's step lines say which and why. Every step runs even when an
# earlier one failed (the benchmarks do not need the tests).
# DRY_RUN=1: the same steps and limits on a CPU at tiny shapes, to check the script itself; the GPU tests
# skip there, and that alone is not a failure. CONVERSATIONS, RATE and KV_BYTES size the bench run steps.
# `source` this file to get the bookkeeping functions without running anything (tests/test_gpu_check.py).
set -uo pipefail
GRACE=5      # seconds between a step's SIGINT and its SIGKILL
DEADLINE=495 # seconds after the start by which tests-rest must end

init() {  # the run's globals: $OUT, $work (a fresh folder), $failures (the failed steps' names)
    OUT=${OUT:-/tmp/fastswitch-gpu-check}
    work=$(mktemp -d)
    failures=""
    : >"$work/steps.md"
}

record() {  # record NAME VERDICT...: one line of the summary; a verdict other than "ok" fails the run
    local name=$1
    shift
    echo "- $name: $*" >>"$work/steps.md"
    echo "== $name: $*"
    [ "$1" = ok ] || failures="$failures $name"
}

limited() {  # limited NAME SECONDS COMMAND...: output to $work/NAME.log; sets $took; returns the exit code
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    echo "== $name (limit ${limit}s)"
    timeout -s INT -k "$GRACE" "$limit" "$@" >"$work/$name.log" 2>&1
    rc=$?
    tail -n 15 "$work/$name.log" | cut -c1-300
    took="in $((SECONDS - start)) s (limit $limit s)"
    return "$rc"
}

why() {  # why EXIT: the verdict for a limited command's exit code
    case $1 in
        0) echo ok ;;
        124) echo "FAILED: timed out, exit 124," ;;
        137) echo "FAILED: timed out, killed, exit 137," ;;
        *) echo "FAILED: exit $1" ;;
    esac
}

step() {  # step NAME SECONDS COMMAND...: one line in the summary; returns the command's exit code
    limited "$@"
    local rc=$?
    record "$1" "$(why $rc)" "$took"
    return "$rc"
}

junit_counts() {  # junit_counts FILE: "PASSED FAILED SKIPPED" from pytest's --junitxml, nothing without one
    python3 - "$1" <<'EOF' 2>/dev/null
import sys
import xml.etree.ElementTree as ET

root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
print(n["tests"] - n["failures"] - n["errors"] - n["skipped"], n["failures"] + n["errors"], n["skipped"])
EOF
}

tests_step() {  # tests_step NAME SECONDS MARKERS: the GPU tests so marked; failed also when none passed
    local name=$1 limit=$2 expr=$3 rc counts passed failed skipped
    if [ "$limit" -le 0 ]; then
        record "$name" "FAILED: no time left before the $DEADLINE s deadline"
        return 1
    fi
    limited "$name" "$limit" python3 -m pytest tests/test_gpu.py -m "$expr" -q --maxfail=5 -p no:cacheprovider \
        --junitxml "$work/$name.xml"
    rc=$?
    counts=$(junit_counts "$work/$name.xml")
    if [ -z "$counts" ]; then
        [ "$rc" = 0 ] && rc=1
        record "$name" "$(why $rc), no JUnit report" "$took"
        return "$rc"
    fi
    read -r passed failed skipped <<<"$counts"
    counts="$passed passed, $failed failed, $skipped skipped"
    if [ "$rc" = 0 ] && [ "$passed" -eq 0 ] && [ "${DRY_RUN:-0}" != 1 ]; then
        record "$name" "FAILED: 0 tests passed ($counts)" "$took"
        return 1
    fi
    record "$name" "$(why $rc)" "$took; $counts"
    return "$rc"
}

finish() {  # finish [EXIT]: summary.md and gpu_check.tar.gz under $OUT; exits 1 if anything failed
    [ "${1:-0}" = 0 ] || record script FAILED: stopped with exit "$1"
    mkdir -p "$OUT"
    local verdict="PASS (exit 0): every step ok"
    [ -z "$failures" ] || verdict="FAIL (exit 1):$failures"
    [ "${DRY_RUN:-0}" != 1 ] || verdict="$verdict (DRY_RUN: GPU tests may skip)"
    {
        echo "# GPU check, $(date -u '+%Y-%m-%d %H:%M UTC'), $((SECONDS)) s"
        echo; echo "**$verdict**"; echo
        head -n 12 "$work/env.log" 2>/dev/null
        echo; cat "$work/steps.md"
        echo; echo "## tests"
        for t in tests-smoke tests-rest; do
            [ -f "$work/$t.log" ] && { echo "### $t"; grep -E '^(FAILED|ERROR) ' "$work/$t.log" | head -n 20
                tail -n 1 "$work/$t.log"; }
        done
        echo; echo "## decode and prefill"; grep '^|' "$work/decode.log" 2>/dev/null
        echo; echo "## swap"; grep -E '^\||slowdown' "$work/swap.log" 2>/dev/null
        echo; echo "## bench run"; cat "$work/compare/compare.md" 2>/dev/null
    } >"$OUT/summary.md"
    timeout 10 tar -czf "$OUT/gpu_check.tar.gz" -C "$work" --exclude='./llama-*' . || echo "pack failed" >&2
    cat "$OUT/summary.md"
    [ -z "$failures" ] || exit 1
    exit 0
}

main() {
    cd "$(dirname "$0")/../.." || exit 1
    init
    trap 'finish $?' EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    if ls .whl/*.whl >/dev/null 2>&1; then
        step wheels 10 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
    fi
    local device size backend dtype batches prefill tokens kv conversations rate
    if [ "${DRY_RUN:-0}" = 1 ]; then
        device=cpu size=tiny backend=auto dtype=float32 batches=1,8 prefill=2x256 tokens=256,1024
        kv=${KV_BYTES:-12000000} conversations=${CONVERSATIONS:-4} rate=${RATE:-4}
    else
        device=cuda size=8b backend=triton dtype=bfloat16 batches=1,8,64,256 prefill=8x1024
        tokens=256,1024,4096,16384 kv=${KV_BYTES:-1610612736} conversations=${CONVERSATIONS:-100} rate=${RATE:-4}
    fi
    local shape="$work/llama-$size"
    step env 15 bash -c 'python3 -c "import torch, triton; print(\"torch\", torch.__version__, \"triton\",
        triton.__version__, \"cuda\", torch.cuda.is_available())" && if command -v nvidia-smi >/dev/null; then
        nvidia-smi; fi'
    step model 10 python3 -m fastswitch demo-model "$shape" --size "$size" --no-weights
    tests_step tests-smoke 60 gpu_smoke
    step decode 75 python3 benchmarks/gpu/decode.py "$shape" --out "$work/decode.json" --device "$device" \
        --attention-backend "$backend" --dtype "$dtype" --batches "$batches" --prefill "$prefill"
    step swap 45 python3 -m fastswitch bench swap --device "$device" --models "$size" --tokens "$tokens" \
        --dtype "$dtype" --json "$work/swap.json" --plot "$work/swap.png" --interference-models "$shape" \
        --load-format dummy
    for preset in baseline fastswitch; do
        step "run-$preset" 75 python3 -m fastswitch bench run --preset "$preset" --model "$shape" \
            --load-format dummy --device "$device" --dtype "$dtype" --attention-backend "$backend" \
            --kv-cache-memory-bytes "$kv" --swap-space 16 --conversations "$conversations" --rate "$rate" \
            --out "$work/$preset"
    done
    step compare 15 python3 -m fastswitch bench compare "$work/baseline" "$work/fastswitch" --out "$work/compare"
    tests_step tests-rest $((DEADLINE - SECONDS)) "gpu and not gpu_smoke"
    true
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    main "$@"
fi
