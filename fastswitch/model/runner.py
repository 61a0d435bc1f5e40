"""Runs one step through the model: a SchedulerOutput in, the sampled tokens out.

It owns the model (with tensor parallelism, this rank's shard of it), the device KV pool, the sampler
and (on CUDA) the decode graphs, and knows nothing about scheduling policy. Every rank samples the
same tokens from the same gathered logits, with the same seeds.
It keeps each live request's tokens (the prompt it was sent, then every token it sampled) and block
table, so a step only says who computes how many tokens, and which blocks their tables gained.
"""

from dataclasses import dataclass, field

import torch

from fastswitch.kv.layout import KVPool
from fastswitch.messages import ModelOutput, SchedulerOutput
from fastswitch.model.attention import StepBatch, select_backend
from fastswitch.model.config import ModelConfig
from fastswitch.model.loader import load_model
from fastswitch.model.parallel import Shard
from fastswitch.model.sampler import SampleInput, Sampler
from fastswitch.sampling import SamplingParams

GRAPH_MAX_BATCH = 512  # larger decode steps run eagerly: their launches are a small share of their time


@dataclass
class _RequestState:
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    block_ids: list[int] = field(default_factory=list)


class ModelRunner:
    def __init__(self, model_cfg: ModelConfig, dtype: torch.dtype, device: torch.device, max_model_len: int,
                 block_size: int, seed: int, attention_backend: str = "auto", dummy_weights: bool = False,
                 max_num_seqs: int = 256, enforce_eager: bool = False, shard: Shard = Shard()):
        self.cfg, self.dtype, self.device, self.block_size = model_cfg, dtype, device, block_size
        self.max_model_len, self.max_num_seqs = max_model_len, max_num_seqs
        self.num_kv_heads = shard.kv_heads(model_cfg)  # this rank's: its KV pool holds only these
        self.model = load_model(model_cfg, dtype, device, max_model_len, dummy_weights, seed, shard)
        self.sampler = Sampler(device, seed)
        self.attention = select_backend(attention_backend, device)
        # captured collectives are untried here: tensor-parallel decodes run eagerly
        self.use_graphs = (device.type == "cuda" and self.attention.name == "triton" and not enforce_eager
                           and shard.size == 1)
        self.graphs = None  # DecodeGraphs, once the KV pool exists
        self.requests: dict[str, _RequestState] = {}

    def allocate_kv(self, num_blocks: int) -> None:
        """Called once the weights are loaded, so a GPU budget can be measured from what is left. With CUDA
        graphs, the pool has one block more, which no request owns: padding rows write there."""
        self.kv = KVPool(num_blocks + self.use_graphs, self.cfg.num_layers, self.block_size, self.num_kv_heads,
                         self.cfg.head_dim, self.dtype, self.device)
        self.kv_layers = self.kv.layers()
        if self.use_graphs:
            from fastswitch.model.cuda_graphs import DecodeGraphs, StaticDecodeInputs  # needs triton

            max_blocks = -(-self.max_model_len // self.block_size)
            batch = min(self.max_num_seqs, GRAPH_MAX_BATCH)
            inputs = StaticDecodeInputs(batch, max_blocks, self.block_size, num_blocks, self.device)
            self.graphs = DecodeGraphs(self.model, self.kv_layers, inputs)

    @torch.inference_mode()
    def profile_forward_bytes(self, num_tokens: int, num_seqs: int) -> int:
        """CUDA: peak memory of one forward of `num_tokens` (a prefill, over a scratch KV pool of its own) and
        logits for `num_seqs` rows, beyond what is allocated now: what the KV pool must leave free."""
        blocks = -(-num_tokens // self.block_size)
        scratch = KVPool(blocks, self.cfg.num_layers, self.block_size, self.num_kv_heads, self.cfg.head_dim,
                         self.dtype, self.device)
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        batch = StepBatch([0, num_tokens], [num_tokens], [list(range(blocks))], list(range(num_tokens)),
                          self.block_size)
        tokens = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        hidden = self.model(tokens, torch.arange(num_tokens, device=self.device), scratch.layers(),
                            self.attention.prepare(batch))
        self.model.compute_logits(hidden[-min(num_seqs, num_tokens):]).softmax(dim=-1)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - before
        del scratch, hidden
        torch.cuda.empty_cache()
        return peak

    @torch.inference_mode()
    def execute(self, step: SchedulerOutput) -> ModelOutput:
        """One forward over the step's batch; a token for each request whose chunk reaches its last token."""
        for request_id in step.finished_ids:
            self.requests.pop(request_id, None)
            self.sampler.forget(request_id)
        for new in step.new_requests:
            self.requests[new.request_id] = _RequestState(list(new.token_ids), new.num_prompt_tokens, new.params)
        if not step.scheduled:
            return ModelOutput([], [], [])
        input_ids, positions, batch, sample_index, samplers = self._prepare(step)
        if self.graphs is not None and len(input_ids) == len(step.scheduled) and self.graphs.fits(len(input_ids)):
            hidden = self.graphs.run(input_ids, positions, batch)  # decodes only
        else:
            hidden = self.model(self._tensor(input_ids), self._tensor(positions), self.kv_layers,
                                self.attention.prepare(batch))
        if not samplers:
            return ModelOutput([], [], [])
        logits = self.model.compute_logits(hidden[self._tensor(sample_index)])
        samples = self.sampler(logits, [self._sample_input(rid) for rid in samplers])
        for rid, sample in zip(samplers, samples):
            self.requests[rid].token_ids.append(sample.token_id)
        return ModelOutput(samplers, [s.token_id for s in samples], [s.logprobs for s in samples])

    def _sample_input(self, request_id: str) -> SampleInput:
        state = self.requests[request_id]
        p = state.params
        stops = [*([] if p.ignore_eos else self.cfg.eos_token_ids), *p.stop_token_ids]
        needs_history = p.has_penalties
        return SampleInput(request_id, p, state.token_ids[: state.num_prompt_tokens] if needs_history else [],
                           state.token_ids[state.num_prompt_tokens :] if needs_history or p.min_tokens else [],
                           stops)

    def _prepare(self, step: SchedulerOutput):
        bs = self.block_size
        ids, positions, slots, sample_index, samplers = [], [], [], [], []
        query_start_loc, seq_lens, block_tables = [0], [], []
        for s in step.scheduled:
            state = self.requests[s.request_id]
            tokens = state.token_ids
            start, end = s.num_computed_tokens, s.num_computed_tokens + s.num_new_tokens
            ids += tokens[start:end]
            positions += range(start, end)
            blocks = state.block_ids = s.block_ids if s.new_table else state.block_ids + s.block_ids
            slots += [blocks[p // bs] * bs + p % bs for p in range(start, end)]
            query_start_loc.append(len(ids))
            seq_lens.append(end)
            block_tables.append(blocks[: -(-end // bs)])
            if end == len(tokens):
                sample_index.append(len(ids) - 1)
                samplers.append(s.request_id)
        batch = StepBatch(query_start_loc, seq_lens, block_tables, slots, bs)
        return ids, positions, batch, sample_index, samplers

    def _tensor(self, values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long).to(self.device, non_blocking=True)
