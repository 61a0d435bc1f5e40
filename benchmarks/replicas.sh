#!/usr/bin/env bash
# Two replicas behind SMG against one replica with the same total KV, on one HTTP workload: for each
# router policy, `fastswitch replicas --num 2` (each replica half of KV_BYTES and half of the cores),
# then `fastswitch bench run --url` through the router; then one `fastswitch serve` with all of
# KV_BYTES and every core; then `fastswitch bench compare` (the cached prompt share is the history
# hit). Prompts go as text (--text-prompts: SMG takes no token-id prompts), to all four alike.
# Needs the router: pip install -e '.[router]'.
#
#   benchmarks/replicas.sh MODEL_DIR KV_BYTES OUT_DIR [bench run options...]
#
# POLICIES (default "consistent_hashing round_robin cache_aware") picks the router policies.
set -euo pipefail
[ $# -ge 3 ] || { sed -n '2,/^set -euo/{/^#/p}' "$0" >&2; exit 2; }
model="$1" kv_bytes="$2" out="$3"
shift 3
port=18700 runs=()
for policy in ${POLICIES:-consistent_hashing round_robin cache_aware}; do
    python -m fastswitch replicas --num 2 --router-policy "$policy" --port "$port" --model "$model" \
        --dtype bfloat16 --kv-cache-memory-bytes $((kv_bytes / 2)) > "$out.$policy.log" 2>&1 &
    pid=$!
    trap 'kill $pid 2>/dev/null || true' EXIT
    until grep -q "serving 2 replicas" "$out.$policy.log"; do
        kill -0 $pid 2>/dev/null || { cat "$out.$policy.log" >&2; exit 1; }
        sleep 1
    done
    python -m fastswitch bench run --mode http --url "http://127.0.0.1:$port/v1" --label "2 replicas, $policy" \
        --model "$model" --out "$out/$policy" --text-prompts "$@"
    kill $pid && wait $pid || true
    trap - EXIT
    runs+=("$out/$policy")
done
python -m fastswitch bench run --mode http --preset fastswitch --label "1 replica" --model "$model" \
    --dtype bfloat16 --kv-cache-memory-bytes "$kv_bytes" --out "$out/one" --text-prompts "$@"
python -m fastswitch bench compare "$out/one" "${runs[@]}" --out "$out"
