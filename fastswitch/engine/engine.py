"""The engine: requests in, one scheduling iteration per `step()`, outputs out.

    engine = Engine(EngineConfig(model=DIR))
    engine.add_request("Hello", SamplingParams(max_tokens=8))
    while engine.has_unfinished_requests():
        for out in engine.step(): ...
"""

import itertools
import logging
import time

import torch

from fastswitch.config import CPU_KV_CACHE_BYTES, DTYPES, GPU_KV_CACHE_FRACTION, EngineConfig
from fastswitch.engine.request import Request, RequestOutput, Status
from fastswitch.engine.policies import make_policy
from fastswitch.engine.scheduler import Scheduler
from fastswitch.engine.stats import EngineStats
from fastswitch.kv.allocator import runs
from fastswitch.kv.layout import KVPool
from fastswitch.kv.manager import KVManager
from fastswitch.kv.swap import SwapManager
from fastswitch.model.config import ModelConfig
from fastswitch.model.cpu_features import cpu_dtype
from fastswitch.model.demo import default_model_path
from fastswitch.model.runner import ModelRunner
from fastswitch.model.tokenizer import IncrementalDetokenizer, Tokenizer
from fastswitch.sampling import SamplingParams

log = logging.getLogger(__name__)

Prompt = str | list[int] | list[dict]


class Engine:
    def __init__(self, config: EngineConfig):
        self.config = config
        path = config.model or default_model_path()
        self.model_config = ModelConfig.from_folder(path)
        self.tokenizer = Tokenizer(path)
        self.max_model_len = _max_model_len(config, self.model_config)
        device = torch.device(config.device)
        self.dtype = _dtype(config.dtype, self.model_config.torch_dtype, device)
        self.runner = ModelRunner(self.model_config, self.dtype, device, self.max_model_len, config.block_size,
                                  config.seed, config.attention_backend)
        num_blocks = config.num_kv_blocks or _blocks_for_budget(config, self.model_config, self.dtype, device)
        self.runner.allocate_kv(num_blocks)
        self.stats = EngineStats()
        per_block = self.runner.kv.data[0].numel() * self.runner.kv.data.element_size()
        num_host_blocks = int(config.swap_space * 2**30) // per_block
        self.host_kv = KVPool(num_host_blocks, self.model_config.num_layers, config.block_size,
                              self.model_config.num_kv_heads, self.model_config.head_dim, self.dtype,
                              torch.device("cpu"), host_for=device)
        self.swapper = SwapManager(self.runner.kv.data, self.host_kv.data, config.swap_mode, self.stats,
                                   config.async_swap)
        self.kv = KVManager(num_blocks, num_host_blocks, config.block_size, self.stats, self.swapper,
                            config.enable_prefix_caching, config.block_groups, config.kv_reuse)
        policy = make_policy(config.policy, config.seed, config.trace_pattern, config.trace_update_freq,
                             config.trace_levels, config.vtc_input_weight, config.vtc_output_weight,
                             config.user_weights())
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens, config.preemption_mode,
                                   policy, config.thrash_guard)
        self.scheduler.costs.block_bytes = self.swapper.block_bytes
        if config.preemption_mode == "auto":
            self.scheduler.costs.copy_bytes_per_s = self.swapper.measure_bandwidth()
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        log.info("engine ready: %s, %s on %s, %s attention, %d KV blocks of %d tokens (%d on the host), "
                 "context limit %d", self.model_config.arch, self.dtype, device, self.runner.attention.name, num_blocks,
                 config.block_size, num_host_blocks, self.max_model_len)

    def add_request(self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None,
                    arrival_time: float | None = None, priority: int = 0, user: str | None = None) -> str:
        """Queue a request; raises ValueError, before anything is queued, if it cannot be served.

        `priority`: lower is served first (policy `priority`); `user`: whose fair share it counts
        against (policy `vtc`)."""
        params = params or SamplingParams()
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise ValueError(f"invalid priority {priority!r}: must be an integer")
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, token_ids = self._tokenize(prompt)
        self._check_fits(token_ids, params)
        detokenizer = IncrementalDetokenizer(self.tokenizer, token_ids, params.skip_special_tokens)
        request = Request(request_id, text, token_ids, params, arrival_time or time.monotonic(), detokenizer,
                          priority, user or "")
        self.requests[request_id] = request
        self.scheduler.add(request)
        return request_id

    def abort(self, request_id: str) -> None:
        request = self.requests.pop(request_id, None)
        if request is not None:
            request.finish_reason = "abort"
            self._release(request)

    def set_priority(self, request_id: str, priority: int) -> bool:
        """Change a queued or running request's priority (lower is served first); False if it is not here."""
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise ValueError(f"invalid priority {priority!r}: must be an integer")
        request = self.requests.get(request_id)
        if request is not None:
            request.priority = priority
        return request is not None

    def preempt(self, request_id: str, mode: str | None = None) -> bool:
        """Pause a running request now (by swap or recompute; default: preemption_mode).

        False if it is not running, or its KV is still being copied in."""
        request = self.requests.get(request_id)
        if request is None or request.status != Status.RUNNING or not self.kv.ready(request):
            return False
        self.scheduler.preempt(request, mode)
        return True

    def kv_stats(self) -> dict:
        """The KV pools now: free and cached blocks, the largest free group, and contiguity (groups per
        running request, 1 is perfectly contiguous)."""
        running = self.scheduler.running
        return {
            "device_blocks": self.kv.num_blocks,
            "device_free_blocks": self.kv.device.allocator.num_free,
            "device_cached_blocks": len(self.kv.device.lru),
            "device_largest_free_group": self.kv.device.allocator.largest_free_group(),
            "host_blocks": self.kv.host.allocator.num_blocks,
            "host_free_blocks": self.kv.host.allocator.num_free,
            "host_cached_blocks": len(self.kv.host.lru),
            "groups_per_request": sum(runs(r.block_ids) for r in running) / len(running) if running else 0.0,
        }

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """One iteration: schedule, run the model, and report every request that produced a token."""
        start = time.perf_counter()
        batch = self.scheduler.schedule()
        if not batch.scheduled:
            self.kv.wait_for_copies()  # nothing can run until a copy lands: wait rather than spin
            return []
        now = time.monotonic()
        for request, _ in batch.scheduled:
            request.metrics.first_scheduled_time = request.metrics.first_scheduled_time or now
        model_start = time.perf_counter()
        samples = self.runner.run(batch.scheduled, list(self.model_config.eos_token_ids))
        model_time = time.perf_counter() - model_start
        now = time.monotonic()
        outputs = []
        for (request, n), sample in zip(batch.scheduled, samples):
            self.scheduler.served(request, n, sample is not None)
            self.stats.computed_tokens += n
            self.kv.commit(request)
            if sample is None:
                continue
            self.stats.generated_tokens += 1
            self._append_token(request, sample.token_id, sample.logprobs, now)
            outputs.append(request.output(holdback=max(map(len, request.params.stop), default=1) - 1))
            if request.finished:
                del self.requests[request.request_id]
        self.scheduler.costs.observe_prefill(sum(n for _, n in batch.scheduled), model_time)
        self.stats.iterations += 1
        self.stats.model_time_s += model_time
        self.stats.step_time_s += time.perf_counter() - start
        return outputs

    def _tokenize(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
            text = self.tokenizer.apply_chat_template(prompt)
            return text, self.tokenizer.encode(text, add_special_tokens=False)
        if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            bad = [t for t in prompt if not 0 <= t < self.model_config.vocab_size]
            if bad:
                raise ValueError(f"prompt token ids out of range [0, {self.model_config.vocab_size}): {bad[:5]}")
            return None, list(prompt)
        raise ValueError("a prompt is a string, a list of token ids, or a list of chat messages")

    def _check_fits(self, token_ids: list[int], params: SamplingParams) -> None:
        if not token_ids:
            raise ValueError("the prompt is empty")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(token_ids)} tokens; the context limit is {self.max_model_len}, "
                             "and at least one token must be generated")
        longest = min(len(token_ids) + (params.max_tokens or self.max_model_len), self.max_model_len)
        blocks = -(-longest // self.config.block_size)
        if blocks > self.kv.num_blocks:
            raise ValueError(f"the request may need {blocks} KV blocks ({longest} tokens), "
                             f"but the KV pool has only {self.kv.num_blocks}")

    def _append_token(self, request: Request, token: int, logprobs: dict | None, now: float) -> None:
        request.token_ids.append(token)
        metrics = request.metrics
        metrics.first_token_time = metrics.first_token_time or now
        metrics.token_times.append(now)
        if request.logprobs is not None:
            request.logprobs.append(logprobs)
        previous_len = len(request.text)
        request.text += request.detokenizer.step(token)
        reason, stop = self._stop_check(request, token, previous_len)
        if reason is not None:
            request.finish_reason, request.stop_reason = reason, stop
            self._release(request)

    def _stop_check(self, request: Request, token: int, previous_len: int) -> tuple[str | None, int | str | None]:
        p = request.params
        if request.num_output_tokens >= p.min_tokens:
            if token in p.stop_token_ids:
                return "stop", token
            if not p.ignore_eos and token in self.model_config.eos_token_ids:
                return "stop", None
            for stop in p.stop:
                at = request.text.find(stop, max(0, previous_len - len(stop) + 1))
                if at != -1:
                    request.text = request.text[: at + (len(stop) if p.include_stop_str_in_output else 0)]
                    return "stop", stop
        if p.max_tokens is not None and request.num_output_tokens >= p.max_tokens:
            return "length", None
        if request.num_tokens >= self.max_model_len:
            return "length", None
        return None, None

    def _release(self, request: Request) -> None:
        self.scheduler.finish(request)
        self.runner.sampler.forget(request.request_id)
        request.metrics.finish_time = time.monotonic()


def _max_model_len(config: EngineConfig, model: ModelConfig) -> int:
    limit = model.max_position_embeddings
    if model.sliding_window is not None and model.sliding_window < limit:
        log.info("context limited to the sliding window (%d tokens), inside which attention is exact",
                 model.sliding_window)
        limit = model.sliding_window
    if config.max_model_len is not None and config.max_model_len > limit:
        raise ValueError(f"max_model_len={config.max_model_len} exceeds the model's limit of {limit}")
    return config.max_model_len or limit


def _dtype(requested: str, model_dtype: str, device: torch.device) -> torch.dtype:
    if requested != "auto":
        return DTYPES[requested]
    return cpu_dtype(DTYPES[model_dtype]) if device.type == "cpu" else DTYPES[model_dtype]


def _blocks_for_budget(config: EngineConfig, model: ModelConfig, dtype: torch.dtype, device: torch.device) -> int:
    budget = config.kv_cache_memory_bytes
    if budget is None:
        budget = CPU_KV_CACHE_BYTES if device.type == "cpu" else int(torch.cuda.mem_get_info(device)[0] * GPU_KV_CACHE_FRACTION)
    per_block = KVPool.bytes_per_block(model.num_layers, config.block_size, model.num_kv_heads, model.head_dim, dtype)
    if budget < per_block:
        raise ValueError(f"KV cache budget of {budget} bytes holds no block ({per_block} bytes each)")
    return budget // per_block
