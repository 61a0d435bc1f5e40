#!/usr/bin/env bash
# FastSwitch's evaluation at this machine's scale: every preset on the same multi-turn conversation
# workload under Markov priorities (offline, real time), then one comparison table and plots.
#
#   benchmarks/conversations.sh OUT_DIR [bench run options...]
#   e.g. benchmarks/conversations.sh benchmarks/results/conversations_tiny --num-kv-blocks 128 --rate 2
#
# PRESETS (default: all six) picks a subset, e.g. PRESETS="baseline fastswitch".
set -euo pipefail
out=$1
shift
presets=${PRESETS:-baseline fastswitch fastswitch-groups fastswitch-async fastswitch-reuse recompute}
for preset in $presets; do
    python -m fastswitch bench run --preset "$preset" --out "$out/$preset" "$@"
done
dirs=()
for preset in $presets; do dirs+=("$out/$preset"); done
python -m fastswitch bench compare "${dirs[@]}" --out "$out"
