#!/usr/bin/env bash
# FastSwitch's experiment at the paper's scale, simulated (issue 15): 1,000 multi-turn conversations,
# markov priorities, a 60 GiB host tier over PCIe 4.0 x16, every preset, for LLaMA-8B on an A10
# (update frequency 0.04) and Qwen-32B on an A100 (0.02); then what-ifs on the 8B setting.
#
#   benchmarks/sim_paper.sh OUT_DIR [RATE_8B RATE_32B [OVERLOAD_8B OVERLOAD_32B]]
#
# RATE_*: conversations per second near what fastswitch sustains; OVERLOAD_*: past it, where even
# fastswitch pauses requests all the time. The what-ifs run at OVERLOAD_8B: they are about the
# cost of a context switch, and below it fastswitch hardly switches.
#
# Each run is `fastswitch sim` (the real scheduler and KV manager, a cost model of the device) and
# writes OUT_DIR/<experiment>/<run>/results.json; each experiment gets a `bench compare` table and
# plots. CPU-heavy runs take the shared lock, one at a time.
set -euo pipefail
out=$1
rate_8b=${2:-2}
rate_32b=${3:-1}
overload_8b=${4:-2.5}
overload_32b=${5:-1.5}
presets="baseline fastswitch fastswitch-groups fastswitch-async fastswitch-reuse recompute"
workload=(--conversations 1000 --max-context 4096 --swap-space 60 --priorities markov --no-progress)
llama=(--model llama3-8b --profile a10 --trace-update-freq 0.04 --rate "$rate_8b")
qwen=(--model qwen2.5-32b --profile a100-80g --trace-update-freq 0.02 --rate "$rate_32b")
heavy=("${llama[@]}" --rate "$overload_8b")

sim() {  # sim EXPERIMENT RUN [options]: one simulated run
    local dir=$out/$1/$2
    shift 2
    [[ -f $dir/results.json ]] || flock /tmp/fastswitch-cpu.lock python -m fastswitch sim --out "$dir" --label "$(basename "$dir")" \
        "${workload[@]}" "$@" > /dev/null
}

compare() {  # compare EXPERIMENT RUN...: the table and plots of an experiment's runs (EXPERIMENT/RUN: another's)
    local experiment=$1
    shift
    local dirs=()
    for run in "$@"; do [[ $run == */* ]] && dirs+=("$out/$run") || dirs+=("$out/$experiment/$run"); done
    python -m fastswitch bench compare "${dirs[@]}" --out "$out/$experiment" > /dev/null
}

for preset in $presets; do
    sim llama8b-a10 "$preset" --preset "$preset" "${llama[@]}"
    sim qwen32b-a100 "$preset" --preset "$preset" "${qwen[@]}"
done
compare llama8b-a10 $presets
compare qwen32b-a100 $presets

for preset in $presets; do
    sim llama8b-a10-overload "$preset" --preset "$preset" "${llama[@]}" --rate "$overload_8b"
    sim qwen32b-a100-overload "$preset" --preset "$preset" "${qwen[@]}" --rate "$overload_32b"
done
compare llama8b-a10-overload $presets
compare qwen32b-a100-overload $presets

# Load: where each configuration saturates
for preset in baseline fastswitch; do
    for rate in 0.5 1.0; do
        sim whatif-load "8b-$preset-rate$rate" --preset "$preset" "${llama[@]}" --rate "$rate"
    done
    for rate in 0.25 0.5; do
        sim whatif-load "32b-$preset-rate$rate" --preset "$preset" "${qwen[@]}" --rate "$rate"
    done
done
compare whatif-load 8b-baseline-rate0.5 8b-baseline-rate1.0 llama8b-a10/baseline llama8b-a10-overload/baseline \
    8b-fastswitch-rate0.5 8b-fastswitch-rate1.0 llama8b-a10/fastswitch llama8b-a10-overload/fastswitch \
    32b-baseline-rate0.25 32b-baseline-rate0.5 qwen32b-a100/baseline qwen32b-a100-overload/baseline \
    32b-fastswitch-rate0.25 32b-fastswitch-rate0.5 qwen32b-a100/fastswitch qwen32b-a100-overload/fastswitch

# What-ifs on the 8B setting at OVERLOAD_8B (the runs at PCIe 4, 16-token blocks, 0.04, 60 GiB are the overload ones)
for preset in baseline fastswitch; do
    sim whatif-pcie5 "$preset-pcie5" --preset "$preset" "${heavy[@]}" --link pcie5
    for block in 8 32; do
        sim whatif-block-size "$preset-block$block" --preset "$preset" "${heavy[@]}" --block-size "$block"
    done
    for freq in 0.01 0.02 0.08; do
        sim whatif-update-freq "$preset-freq$freq" --preset "$preset" "${heavy[@]}" --trace-update-freq "$freq"
    done
    for gib in 4 16; do
        sim whatif-host-tier "$preset-host${gib}g" --preset "$preset" "${heavy[@]}" --swap-space "$gib"
    done
done
for gib in 4 16; do  # recomputation keeps no paused request's KV on the host, only cached histories
    sim whatif-host-tier "recompute-host${gib}g" --preset recompute "${heavy[@]}" --swap-space "$gib"
done
o=llama8b-a10-overload
compare whatif-pcie5 $o/baseline baseline-pcie5 $o/fastswitch fastswitch-pcie5
compare whatif-block-size baseline-block8 $o/baseline baseline-block32 fastswitch-block8 $o/fastswitch fastswitch-block32
compare whatif-update-freq baseline-freq0.01 baseline-freq0.02 $o/baseline baseline-freq0.08 \
    fastswitch-freq0.01 fastswitch-freq0.02 $o/fastswitch fastswitch-freq0.08
compare whatif-host-tier baseline-host4g baseline-host16g $o/baseline fastswitch-host4g fastswitch-host16g $o/fastswitch \
    recompute-host4g recompute-host16g $o/recompute

# Policies, fastswitch: priorities re-drawn (trace, markov) against fcfs, vtc and slo without them
for policy in fcfs vtc slo; do
    sim whatif-policy "$policy" --preset fastswitch "${heavy[@]}" --priorities none --policy "$policy"
done
compare whatif-policy fcfs vtc $o/fastswitch slo
