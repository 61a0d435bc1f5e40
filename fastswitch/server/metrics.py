"""Prometheus metrics, `fastswitch:` names. Engine counters and gauges come from the latest snapshot
the engine core published; latency histograms and SLO attainment (against the per-level targets of
`--slo-ttft` / `--slo-tbt`) are observed here as requests finish. The gauges routers read for load
(SMG, the Gateway API Inference Extension) are exported under vLLM's names too, labelled
`model_name` as vLLM labels them."""

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from fastswitch.engine.outputs import RequestOutput
from fastswitch.messages import Snapshot
from fastswitch.slo import SLO
from fastswitch.stats import EngineStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
COUNTERS = {  # EngineStats field -> (metric name, help)
    "computed_tokens": ("tokens_computed", "Tokens run through the model (prompts, recomputation, decodes)"),
    "generated_tokens": ("generation_tokens", "Tokens generated"),
    "swap_out_bytes": ("swap_out_bytes", "Bytes of KV copied to the host to pause requests"),
    "swap_in_bytes": ("swap_in_bytes", "Bytes of KV copied back to the device"),
    "swap_out_blocks": ("swap_out_blocks", "KV blocks copied to the host to pause requests"),
    "swap_in_blocks": ("swap_in_blocks", "KV blocks copied back to the device"),
    "copies": ("swap_copies", "Copy operations issued for swaps"),
    "reuse_saved_blocks": ("reuse_saved_blocks", "Blocks a swap-out did not copy: already valid on the host"),
    "prefix_device_hit_blocks": ("prefix_device_hit_blocks", "Prompt blocks found in the device prefix cache"),
    "prefix_host_hit_blocks": ("prefix_host_hit_blocks", "Prompt blocks found in the host tier"),
    "resume_device_blocks": ("resume_device_blocks", "Blocks resumes found still cached on the device (not copied)"),
    "resume_recomputed_tokens": ("resume_recomputed_tokens", "Tokens resumes found in neither tier (recomputed)"),
    "writeback_blocks": ("writeback_blocks", "Blocks copied to the host tier by write-through and write-back"),
    "recompute_fallbacks": ("recompute_fallbacks", "Swap preemptions the host tier could not hold whole"),
    "copy_failures": ("copy_failures", "KV copies that failed (their requests recomputed, nothing served from them)"),
    "stall_s": ("stall_seconds", "Time the compute path waited on copies"),
    "iterations": ("iterations", "Scheduling iterations that ran the model"),
}


class EngineCollector:
    def __init__(self, snapshot: Callable[[], Snapshot | None], prompt_tokens: dict[str, int], model_name: str):
        self.snapshot, self.prompt_tokens, self.model_name = snapshot, prompt_tokens, model_name

    def collect(self):
        snap = self.snapshot() or Snapshot(EngineStats(), 0, 0, 0, 0.0, 0.0, None)
        for name, value, help in (("num_requests_running", snap.running, "Requests holding device KV"),
                                  ("num_requests_waiting", snap.waiting, "Requests not started, or to recompute"),
                                  ("kv_cache_usage_perc", snap.kv_usage, "Device KV blocks in use (0-1)")):
            yield GaugeMetricFamily(f"fastswitch:{name}", help, value=value)
            vllm = GaugeMetricFamily(f"vllm:{name}", help + " (vLLM's name, for routers)", labels=["model_name"])
            vllm.add_metric([self.model_name], value)
            yield vllm
        yield GaugeMetricFamily("fastswitch:num_requests_paused", "Requests paused on the host", value=snap.paused)
        yield GaugeMetricFamily("fastswitch:host_kv_cache_usage_perc", "Host KV blocks in use (0-1)",
                                value=snap.host_kv_usage)
        for field, (name, help) in COUNTERS.items():
            yield CounterMetricFamily(f"fastswitch:{name}", help, value=getattr(snap.stats, field))
        yield CounterMetricFamily("fastswitch:prompt_tokens", "Prompt tokens of finished requests",
                                  value=self.prompt_tokens["total"])
        preemptions = CounterMetricFamily("fastswitch:preemptions", "Requests preempted, by how", labels=["mode"])
        preemptions.add_metric(["swap"], snap.stats.swap_preemptions)
        preemptions.add_metric(["recompute"], snap.stats.recompute_preemptions)
        yield preemptions
        if snap.user_service is not None:
            service = GaugeMetricFamily("fastswitch:vtc_user_service", "Per-user virtual token counter (vtc)",
                                        labels=["user"])
            for user, value in snap.user_service.items():
                service.add_metric([user or "-"], value)
            yield service


class Metrics:
    def __init__(self, snapshot: Callable[[], Snapshot | None], slo: SLO, model_name: str):
        self.registry, self.slo = CollectorRegistry(), slo
        self.prompt_tokens = {"total": 0}
        self.registry.register(EngineCollector(snapshot, self.prompt_tokens, model_name))
        self.ttft = Histogram("fastswitch:time_to_first_token_seconds", "Time to first token", ["priority"],
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tbt = Histogram("fastswitch:time_between_tokens_seconds", "Time between tokens", ["priority"],
                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.e2e = Histogram("fastswitch:e2e_request_latency_seconds", "Arrival to finish", ["priority"],
                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.paused = Histogram("fastswitch:request_paused_seconds", "Time a finished request spent preempted",
                                ["priority"], buckets=(0, *LATENCY_BUCKETS), registry=self.registry)
        self.preempted = Counter("fastswitch:request_preemptions", "Preemptions of finished requests, by priority",
                                 ["priority"], registry=self.registry)
        self.attained = Counter("fastswitch:slo_attained", "Finished requests within their level's target, by kind "
                                "(ttft: time to first token; tbt: mean time between tokens)", ["priority", "kind"],
                                registry=self.registry)
        self.rejected = Counter("fastswitch:requests_rejected", "Requests answered 429, by priority and reason "
                                "(overloaded: shed by admission control; queue_full: over --max-queue)",
                                ["priority", "reason"], registry=self.registry)
        self.missed = Counter("fastswitch:slo_missed", "Finished requests past their level's target, by kind",
                              ["priority", "kind"], registry=self.registry)

    def observe(self, out: RequestOutput, priority: int) -> None:
        m, label = out.metrics, str(priority)
        self.prompt_tokens["total"] += len(out.prompt_token_ids)
        if m.first_token_time is not None:
            self.ttft.labels(label).observe(m.first_token_time - m.arrival_time)
        for earlier, later in zip(m.token_times, m.token_times[1:]):
            self.tbt.labels(label).observe(later - earlier)
        if m.finish_time is not None:
            self.e2e.labels(label).observe(m.finish_time - m.arrival_time)
        self.paused.labels(label).observe(m.paused_s)
        self.preempted.labels(label).inc(m.num_preemptions)
        if m.first_token_time is not None:
            gaps = [later - earlier for earlier, later in zip(m.token_times, m.token_times[1:])]
            met = self.slo.met(priority, m.first_token_time - m.arrival_time, gaps)
            for kind, ok in zip(("ttft", "tbt"), met):
                (self.attained if ok else self.missed).labels(label, kind).inc()
