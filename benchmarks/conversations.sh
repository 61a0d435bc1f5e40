#!/usr/bin/env bash
# FastSwitch's evaluation at this machine's scale: every preset on the same multi-turn conversation
# workload under Markov priorities (offline, real time), then one comparison table and plots.
#
#   benchmarks/conversations.sh OUT_DIR [bench run options...]
#   e.g. benchmarks/conversations.sh benchmarks/results/conversations_tiny --num-kv-blocks 128 --rate 2
#
# PRESETS (default: all eight) picks a subset, e.g. PRESETS="baseline fastswitch"; PRESET-swap is PRESET with
# --preemption-mode swap (forced, against the default auto).
# REPEATS=N (default 1) runs every preset N times, alternating presets within each round (so drift on a
# shared machine hits all alike), into OUT_DIR/PRESET/run-K; each round gets its own comparison
# (OUT_DIR/round-K), and benchmarks/repeats.py writes OUT_DIR/repeats.md: median and spread per preset.
set -euo pipefail
out=$1
shift
presets=${PRESETS:-baseline fastswitch fastswitch-groups fastswitch-async fastswitch-reuse recompute vllm-v1 sglang}
repeats=${REPEATS:-1}
here="$(cd "$(dirname "$0")" && pwd)"
for round in $(seq 1 "$repeats"); do
    dirs=()
    for preset in $presets; do
        dir="$out/$preset"
        [ "$repeats" = 1 ] || dir="$dir/run-$round"
        forced=()
        [ "${preset%-swap}" = "$preset" ] || forced=(--preemption-mode swap)
        python -m fastswitch bench run --preset "${preset%-swap}" --label "$preset" --out "$dir" --no-progress \
            "${forced[@]}" "$@"
        dirs+=("$dir")
    done
    if [ "$repeats" = 1 ]; then
        python -m fastswitch bench compare "${dirs[@]}" --out "$out"
    else
        python -m fastswitch bench compare "${dirs[@]}" --out "$out/round-$round" > /dev/null
    fi
done
[ "$repeats" = 1 ] || python "$here/repeats.py" "$out"
