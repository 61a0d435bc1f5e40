#!/usr/bin/env bash
# FastSwitch's experiment at the paper's scale, simulated (issue 15): 1,000 multi-turn conversations,
# markov priorities, a 60 GiB host tier over PCIe 4.0 x16, every preset, for LLaMA-8B on an A10
# (update frequency 0.04) and Qwen-32B on an A100 (0.02); then what-ifs on the 8B setting.
#
#   benchmarks/sim_paper.sh OUT_DIR [RATE_8B] [RATE_32B]
#
# Each run is `fastswitch sim` (the real scheduler and KV manager, a cost model of the device) and
# writes OUT_DIR/<experiment>/<run>/results.json; each experiment gets a `bench compare` table and
# plots. CPU-heavy runs take the shared lock, one at a time.
set -euo pipefail
out=$1
rate_8b=${2:-2}
rate_32b=${3:-1}
presets="baseline fastswitch fastswitch-groups fastswitch-async fastswitch-reuse recompute"
workload=(--conversations 1000 --max-context 4096 --swap-space 60 --priorities markov --no-progress)
llama=(--model llama3-8b --profile a10 --trace-update-freq 0.04 --rate "$rate_8b")
qwen=(--model qwen2.5-32b --profile a100-80g --trace-update-freq 0.02 --rate "$rate_32b")

sim() {  # sim EXPERIMENT RUN [options]: one simulated run
    local dir=$out/$1/$2
    shift 2
    [[ -f $dir/results.json ]] || flock /tmp/fastswitch-cpu.lock python -m fastswitch sim --out "$dir" --label "$(basename "$dir")" \
        "${workload[@]}" "$@" > /dev/null
}

compare() {  # compare EXPERIMENT RUN...: the table and plots of an experiment's runs
    local experiment=$1
    shift
    local dirs=()
    for run in "$@"; do dirs+=("$out/$experiment/$run"); done
    python -m fastswitch bench compare "${dirs[@]}" --out "$out/$experiment" > /dev/null
}

for preset in $presets; do
    sim llama8b-a10 "$preset" --preset "$preset" "${llama[@]}"
    sim qwen32b-a100 "$preset" --preset "$preset" "${qwen[@]}"
done
compare llama8b-a10 $presets
compare qwen32b-a100 $presets

for preset in baseline fastswitch; do
    sim whatif-pcie5 "$preset-pcie4" --preset "$preset" "${llama[@]}"
    sim whatif-pcie5 "$preset-pcie5" --preset "$preset" "${llama[@]}" --link pcie5
    for block in 8 16 32; do
        sim whatif-block-size "$preset-block$block" --preset "$preset" "${llama[@]}" --block-size "$block"
    done
    for freq in 0.01 0.02 0.04 0.08; do
        sim whatif-update-freq "$preset-freq$freq" --preset "$preset" "${llama[@]}" --trace-update-freq "$freq"
    done
    for gib in 4 16 60; do
        sim whatif-host-tier "$preset-host${gib}g" --preset "$preset" "${llama[@]}" --swap-space "$gib"
    done
done
compare whatif-pcie5 baseline-pcie4 baseline-pcie5 fastswitch-pcie4 fastswitch-pcie5
compare whatif-block-size baseline-block8 baseline-block16 baseline-block32 fastswitch-block8 fastswitch-block16 \
    fastswitch-block32
compare whatif-update-freq baseline-freq0.01 baseline-freq0.02 baseline-freq0.04 baseline-freq0.08 \
    fastswitch-freq0.01 fastswitch-freq0.02 fastswitch-freq0.04 fastswitch-freq0.08
compare whatif-host-tier baseline-host4g baseline-host16g baseline-host60g fastswitch-host4g fastswitch-host16g \
    fastswitch-host60g

# Policies: markov priorities sent with each request (ranked by priority, slo) against fcfs and vtc without them
for policy in fcfs vtc; do
    sim whatif-policy "$policy" --preset fastswitch "${llama[@]}" --priorities none --policy "$policy"
done
sim whatif-policy trace-markov --preset fastswitch "${llama[@]}"
sim whatif-policy slo --preset fastswitch "${llama[@]}" --priorities none --policy slo
compare whatif-policy fcfs vtc trace-markov slo
