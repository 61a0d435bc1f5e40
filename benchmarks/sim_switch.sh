#!/usr/bin/env bash
# Issue 22's question, simulated at the paper's scale: does pausing by swap pay against what users run
# today? fastswitch (`auto`, the default, and forced swap) against recompute, vllm-v1 and sglang (docs/baselines.md), for
# LLaMA-8B on an A10 and Qwen-32B on an A100, near capacity and past it, with sim_paper.sh's workload
# (1,000 conversations, markov priorities, 60 GiB of host over PCIe 4.0); then the 8B overload with a
# 4 GiB host tier, where paused requests compete with cached histories for the host.
#
#   benchmarks/sim_switch.sh OUT_DIR
#
# Writes OUT_DIR/<setting>/<preset>/results.json and a `bench compare` table per setting (compare.md,
# with every run against the best of recompute, vllm-v1 and sglang). JOBS (default 2) simulations run at
# once: they are single-threaded and in simulated time, so they need cores, not a quiet machine.
# SEEDS (default "0") lists workload seeds: with more than one, each seed's runs go to
# OUT_DIR/<setting>/run-<seed>/<preset> with a comparison there, and benchmarks/repeats.py writes
# OUT_DIR/<setting>/repeats.md: each figure's median and spread over the seeds.
set -euo pipefail
out=$1
jobs=${JOBS:-2}
workload=(--conversations 1000 --max-context 4096 --priorities markov --no-progress)
declare -A settings=(
    [llama8b-a10]="--model llama3-8b --profile a10 --trace-update-freq 0.04 --rate 2 --swap-space 60"
    [llama8b-a10-overload]="--model llama3-8b --profile a10 --trace-update-freq 0.04 --rate 2.5 --swap-space 60"
    [qwen32b-a100]="--model qwen2.5-32b --profile a100-80g --trace-update-freq 0.02 --rate 1 --swap-space 60"
    [qwen32b-a100-overload]="--model qwen2.5-32b --profile a100-80g --trace-update-freq 0.02 --rate 1.5 --swap-space 60"
    [llama8b-a10-overload-host4g]="--model llama3-8b --profile a10 --trace-update-freq 0.04 --rate 2.5 --swap-space 4"
)
runs=(fastswitch fastswitch-swap recompute vllm-v1 sglang)  # fastswitch: auto, the default; -swap: forced
read -r -a seeds <<< "${SEEDS:-0}"
here="$(cd "$(dirname "$0")" && pwd)"
folder() {  # where one setting's runs for one seed go
    if [ "${#seeds[@]}" = 1 ]; then echo "$out/$1"; else echo "$out/$1/run-$2"; fi
}
for seed in "${seeds[@]}"; do
    for setting in "${!settings[@]}"; do
        for run in "${runs[@]}"; do
            preset=${run%-swap}
            extra=(--workload-seed "$seed")
            [ "$run" = "$preset" ] || extra+=(--preemption-mode swap)
            dir="$(folder "$setting" "$seed")/$run"
            [ -f "$dir/results.json" ] && continue
            # shellcheck disable=SC2086  # a setting is a list of options
            echo "python -m fastswitch sim --out $dir --label $run --preset $preset ${settings[$setting]} ${workload[*]} ${extra[*]}"
        done
    done
done | xargs -P "$jobs" -I{} bash -c "{} > /dev/null"
for setting in "${!settings[@]}"; do
    for seed in "${seeds[@]}"; do
        dir=$(folder "$setting" "$seed")
        python -m fastswitch bench compare "${runs[@]/#/$dir/}" --out "$dir" > /dev/null
    done
    [ "${#seeds[@]}" = 1 ] || python "$here/repeats.py" "$out/$setting" > /dev/null
done
echo "wrote $out/*/compare.md"
