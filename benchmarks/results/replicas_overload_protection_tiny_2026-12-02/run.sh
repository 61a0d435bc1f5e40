#!/usr/bin/env bash
# $1: worktree, $2: label. 2 replicas behind SMG consistent_hashing, 40 conversations at 1/s.
set -u
cd "$1"; export PYTHONPATH="$1"
model=~/.cache/fastswitch/demo-llama-tiny port=18900 out=/tmp/tpt/prot-$2
python -m fastswitch replicas --num 2 --router-policy consistent_hashing --port $port --model $model --dtype bfloat16 \
    --kv-cache-memory-bytes 5242880 > $out.log 2>&1 &
pid=$!
until grep -q "serving 2 replicas" $out.log; do sleep 1; kill -0 $pid || exit 1; done
python -m fastswitch bench run --mode http --url http://127.0.0.1:$port/v1 --label "$2" --model $model --out $out \
    --text-prompts --conversations 40 --rate 1.0 --priorities none --workload-seed 7 --request-timeout 120 --no-progress > $out.out 2>&1
kill $pid; wait $pid
