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
# POLICIES (default "consistent_hashing round_robin cache_aware") picks the router policies; an entry
# POLICY:ARG,ARG adds SMG options to that run (e.g. power_of_two:--sticky-sessions). ENGINE_ARGS
# (e.g. "--policy vtc") go to every engine, the replicas' and the single one's; TAG, if set, ends every
# run's label (e.g. "by user", for runs given --routing-key user); SKIP_ONE=1 skips the single replica.
set -euo pipefail
[ $# -ge 3 ] || { sed -n '2,/^set -euo/{/^#/p}' "$0" >&2; exit 2; }
model="$1" kv_bytes="$2" out="$3"
shift 3
port=18700 runs=()
read -r -a engine_args <<< "${ENGINE_ARGS:-}"
for entry in ${POLICIES:-consistent_hashing round_robin cache_aware}; do
    policy=${entry%%:*} name=${entry//[:,]/_}
    router_args=() passed=()
    [ "$entry" = "$policy" ] || IFS=, read -r -a router_args <<< "${entry#*:}"
    for arg in "${router_args[@]}"; do passed+=("--router-arg=$arg"); done
    python -m fastswitch replicas --num 2 --router-policy "$policy" --port "$port" --model "$model" \
        --dtype bfloat16 --kv-cache-memory-bytes $((kv_bytes / 2)) "${engine_args[@]}" "${passed[@]}" \
        > "$out.$name.log" 2>&1 &
    pid=$!
    trap 'kill $pid 2>/dev/null || true' EXIT
    until grep -q "serving 2 replicas" "$out.$name.log"; do
        kill -0 $pid 2>/dev/null || { cat "$out.$name.log" >&2; exit 1; }
        sleep 1
    done
    python -m fastswitch bench run --mode http --url "http://127.0.0.1:$port/v1" \
        --label "2 replicas, $policy${router_args[*]:+ ${router_args[*]}}${TAG:+, $TAG}" --model "$model" --out "$out/$name" \
        --text-prompts "$@"
    kill $pid && wait $pid || true
    trap - EXIT
    runs+=("$out/$name")
done
if [ -z "${SKIP_ONE:-}" ]; then
    python -m fastswitch bench run --mode http --preset fastswitch --label "1 replica${TAG:+, $TAG}" --model "$model" \
        --dtype bfloat16 --kv-cache-memory-bytes "$kv_bytes" "${engine_args[@]}" --out "$out/one" --text-prompts "$@"
    runs=("$out/one" "${runs[@]}")
fi
python -m fastswitch bench compare "${runs[@]}" --out "$out"
