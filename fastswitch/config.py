"""Engine options: one name each, the same as a Python keyword and (with dashes) on the command line."""

import argparse
import os
from dataclasses import MISSING, dataclass, field, fields

from fastswitch.slo import DEFAULT_SHED, DEFAULT_TBT, DEFAULT_TTFT, SLO, parse_shed_bounds

DTYPES = ("float32", "bfloat16", "float16")
CPU_KV_CACHE_BYTES = 1 << 30


def _opt(default, help: str, **extra):
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class EngineConfig:
    model: str | None = _opt(None, "Hugging Face model folder (config.json, *.safetensors, tokenizer.json); "
                                   "default: the built-in tiny demo model")
    load_format: str = _opt("auto", "'auto': the folder's safetensors; 'dummy': random weights, no weight files read "
                                     "(a model's shape alone, for benchmarks)", choices=["auto", "dummy"])
    dtype: str = _opt("auto", "weights and KV cache dtype; 'auto': the model's own, except half precision on a CPU "
                              "that does not compute it natively (then float32; the log says which and why)",
                      choices=["auto", *DTYPES])
    device: str = _opt("auto", "'cuda', 'cpu', or 'auto' (cuda when available)")
    block_size: int = _opt(16, "tokens per KV block")
    attention_backend: str = _opt("auto", "'cpu': a compiled kernel that reads the paged KV in place (built for this "
                                          "CPU on first use); 'torch': the reference, which gathers and pads; "
                                          "'triton': a Triton kernel for CUDA that reads the pool in place; "
                                          "'auto': cpu on a CPU when it builds, else torch",
                                  choices=["auto", "cpu", "torch", "triton"])
    enforce_eager: bool = _opt(False, "run every step eagerly; default: on CUDA with the triton attention backend, "
                                      "decode steps replay CUDA graphs captured at start-up for batch sizes 1, 2, 4, "
                                      "8, 16, ... up to max_num_seqs")
    max_model_len: int | None = _opt(None, "context limit (prompt + output); default: the model's")
    max_num_seqs: int = _opt(256, "most requests in one iteration's batch")
    max_num_batched_tokens: int = _opt(2048, "token budget of one iteration; longer prompts are prefilled in chunks")
    num_kv_blocks: int | None = _opt(None, "size of the device KV pool in blocks (overrides kv_cache_memory_bytes)")
    kv_cache_memory_bytes: int | None = _opt(None, "device KV pool size in bytes; default: 1 GiB on CPU; on CUDA "
                                                   "what gpu_memory_utilization leaves")
    gpu_memory_utilization: float = _opt(0.9, "CUDA: the share of the GPU's memory this engine may take in all; the "
                                              "KV pool gets what is left of it after the weights and the peak of a "
                                              "profiling forward at the full token budget")
    swap_space: float = _opt(4.0, "host KV tier size in GiB (pinned memory on CUDA), where paused requests' KV goes")
    swap_mode: str = _opt("fastswitch", "'fastswitch': coalesced copies off the compute path, host copies reused; "
                                        "'baseline': vLLM V0's per-block, per-layer synchronous copies",
                          choices=["fastswitch", "baseline"])
    block_groups: bool = _opt(True, "allocate KV in contiguous block groups, so a swap is a few large copies; off (an "
                                    "ablation): single blocks off a free list, as vLLM V0 does")
    async_swap: bool = _opt(True, "copy swaps off the compute path; off (an ablation): the same copies, inline")
    kv_reuse: bool = _opt(True, "keep a resumed request's host copy, so its next swap-out copies only newer blocks, and "
                                "reuse host-cached prefixes; off (an ablation): every swap-out copies everything")
    policy: str = _opt("fcfs", "who is served first: 'fcfs' (arrival), 'priority' (per request, lower first), "
                               "'vtc' (per-user fair share), 'slo' (levels in order, then the earliest deadline "
                               "against the per-level targets, with admission control past capacity), 'trace' "
                               "(priorities re-drawn as the run goes)",
                       choices=["fcfs", "priority", "vtc", "slo", "trace"])
    preemption_mode: str = _opt("auto", "how a request is paused: 'swap' its KV to the host (recompute if the host is "
                                        "full), 'recompute' it later, or 'auto': whichever is cheaper, from the "
                                        "measured copy bandwidth and prefill speed and how often the host's "
                                        "evicted history is wanted again",
                                choices=["swap", "recompute", "auto"])
    priority_aging: float = _opt(0.0, "priority policy: a request rises one level per this many seconds since it "
                                       "arrived, so no level waits without bound; 0: strict priority, as in vLLM")
    slo_ttft: str = _opt(DEFAULT_TTFT, "time-to-first-token target per priority level, 'level=seconds,...' or one "
                                       "number for all: the slo policy's deadlines and the fastswitch:slo_* metrics")
    slo_tbt: str = _opt(DEFAULT_TBT, "target of the mean time between tokens per priority level, as for slo_ttft")
    shed: str = _opt("auto", "admission control past capacity: 'level=bound,...' refuses (HTTP 429, Retry-After) a "
                             "request of that level or worse that has no first token and cannot start within "
                             "bound x its TTFT target (waited, or predicted from the queue ahead and the measured "
                             f"start rate); 'off': never; 'auto': {DEFAULT_SHED} under the slo policy, off otherwise")
    thrash_guard: int = _opt(2, "iterations a just-resumed request is safe from being preempted again")
    trace_pattern: str = _opt("random", "trace policy: 'random' re-draws a priority level, 'markov' moves one level",
                              choices=["random", "markov"])
    trace_update_freq: float = _opt(0.04, "trace policy: probability per iteration that a request's priority changes")
    trace_levels: int = _opt(4, "trace policy: number of priority levels")
    vtc_input_weight: float = _opt(1.0, "vtc policy: service charged per prompt token")
    vtc_output_weight: float = _opt(2.0, "vtc policy: service charged per generated token")
    vtc_user_weights: str = _opt("", "vtc policy: per-user shares, e.g. 'alice=2,bob=1' (default 1 each)")
    host_write_through: str = _opt("off", "copy full blocks to the host tier as they are computed, so a later pause "
                                          "or eviction finds them there: 'off', 'prompt' (prompt blocks only, as "
                                          "vLLM's CPU offloading and SGLang's HiCache do), 'all', or 'spare' (all, "
                                          "but only into free host blocks and one copy in flight at a time)",
                                   choices=["off", "prompt", "all", "spare"])
    host_write_back: bool = _opt(True, "when a request finishes or is preempted by recomputation, copy its full "
                                       "blocks the host tier lacks there, for later turns and resumes")
    enable_prefix_caching: bool = _opt(True, "keep finished requests' KV (device, then host) and reuse it for "
                                              "prompts that start with the same tokens")
    tensor_parallel_size: int = _opt(1, "split the model over this many ranks (processes started by the engine, "
                                        "over torch.distributed: gloo on CPU, each rank on its share of the cores; "
                                        "NCCL on CUDA, one GPU each): attention heads, MLP columns, vocabulary and "
                                        "KV heads (replicated when fewer than the ranks) are sharded")
    nnodes: int = _opt(1, "machines the tensor-parallel ranks span, tensor_parallel_size / nnodes on each: the engine "
                          "runs on node 0 with its share, `fastswitch ranks --node-rank K` on each other node")
    node_rank: int = _opt(0, "this machine's place among nnodes (0: the one that runs the engine)")
    dist_init_addr: str | None = _opt(None, "with nnodes > 1, HOST:PORT of node 0, where every rank meets: "
                                            "torch.distributed's TCP rendezvous on PORT, the engine's sockets on "
                                            "PORT+1 to PORT+1+tensor_parallel_size")
    seed: int = _opt(0, "seed of the sampler for requests without their own seed")
    cpu_cores: str | None = _opt(None, "CPU cores the engine runs on, e.g. '0-3' or '0,2,4-5': its process is pinned "
                                       "to them and runs that many threads (replicas sharing a machine each take "
                                       "their own); default: every core this process may use")

    def __post_init__(self):
        if self.dtype not in ("auto", *DTYPES):
            raise ValueError(f"invalid dtype {self.dtype!r}; choose from auto, {', '.join(DTYPES)}")
        self._check_device()
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_model_len", "num_kv_blocks",
                     "kv_cache_memory_bytes", "tensor_parallel_size", "nnodes"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"invalid {name}={value!r}: must be a positive integer")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"invalid gpu_memory_utilization={self.gpu_memory_utilization!r}: a share in (0, 1]")
        if not self.swap_space >= 0:
            raise ValueError(f"invalid swap_space={self.swap_space!r}: must be >= 0 GiB")
        if not self.priority_aging >= 0:
            raise ValueError(f"invalid priority_aging={self.priority_aging!r}: seconds, >= 0 (0: strict priority)")
        if self.host_write_through not in ("off", "prompt", "all", "spare"):
            raise ValueError(f"invalid host_write_through={self.host_write_through!r}; choose from off, prompt, all, spare")
        if not (isinstance(self.thrash_guard, int) and self.thrash_guard >= 0):
            raise ValueError(f"invalid thrash_guard={self.thrash_guard!r}: must be an integer >= 0")
        self.user_weights()  # validates
        self.slo()
        self.shed_bounds()
        self.cpu_set()
        self._check_ranks()

    def _check_device(self) -> None:
        import torch  # here, not at the top: the engine core and the scheduler read the config without torch

        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            device = torch.device(self.device)
        except RuntimeError:
            raise ValueError(f"invalid device {self.device!r}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' asked for, but CUDA is not available")

    def _check_ranks(self) -> None:
        if self.tensor_parallel_size % self.nnodes:
            raise ValueError(f"tensor_parallel_size={self.tensor_parallel_size} does not divide over nnodes={self.nnodes}")
        if not (isinstance(self.node_rank, int) and 0 <= self.node_rank < self.nnodes):
            raise ValueError(f"invalid node_rank={self.node_rank!r}: from 0 to nnodes - 1 ({self.nnodes - 1})")
        if self.nnodes > 1:
            self.rendezvous()
        if self.tensor_parallel_size == 1:
            return
        if not self.device.startswith("cuda"):
            self.rank_cores()
            return
        import torch

        if len(self.local_ranks()) > torch.cuda.device_count():
            raise ValueError(f"tensor_parallel_size={self.tensor_parallel_size} needs {len(self.local_ranks())} GPUs "
                             f"on this node, one per rank; {torch.cuda.device_count()} are visible")

    def local_ranks(self) -> range:
        """The tensor-parallel ranks this node runs."""
        per_node = self.tensor_parallel_size // self.nnodes
        return range(self.node_rank * per_node, (self.node_rank + 1) * per_node)

    def rendezvous(self) -> tuple[str, int]:
        """(host, port) of `dist_init_addr`."""
        host, _, port = (self.dist_init_addr or "").rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536 - 1 - self.tensor_parallel_size:
            raise ValueError(f"invalid dist_init_addr={self.dist_init_addr!r}: nnodes={self.nnodes} needs node 0's "
                             "HOST:PORT, where every rank meets")
        return host, int(port)

    def rank_cores(self) -> list[list[int]]:
        """CPU: each of this node's ranks' share of the cores (`cpu_cores`, else every core this process may use)."""
        cores = self.cpu_set() or sorted(os.sched_getaffinity(0))
        size = len(self.local_ranks())
        if size > len(cores):
            here = f", {size} on this node" if self.nnodes > 1 else ""
            raise ValueError(f"tensor_parallel_size={self.tensor_parallel_size} needs a CPU core per rank{here}; "
                             f"{len(cores)} available")
        share = len(cores) // size
        return [cores[r * share : (r + 1) * share] for r in range(size)]

    def slo(self) -> SLO:
        return SLO.parse(self.slo_ttft, self.slo_tbt)

    def cpu_set(self) -> list[int] | None:
        """The cores of `cpu_cores`, checked against those this process may use (None: not pinned)."""
        return None if self.cpu_cores is None else parse_cores(str(self.cpu_cores))

    def shed_bounds(self) -> dict[int, float]:
        """Admission control's bounds by level, in TTFT targets (empty: off)."""
        if self.shed == "auto":
            return parse_shed_bounds(DEFAULT_SHED if self.policy == "slo" else "off")
        return parse_shed_bounds(self.shed)

    def user_weights(self) -> dict[str, float]:
        weights = {}
        for item in filter(None, self.vtc_user_weights.split(",")):
            user, _, weight = item.partition("=")
            try:
                weights[user.strip()] = float(weight)
            except ValueError:
                raise ValueError(f"invalid vtc_user_weights entry {item!r}: expected user=weight") from None
            if not weights[user.strip()] > 0:
                raise ValueError(f"invalid vtc_user_weights entry {item!r}: a weight must be > 0")
        return weights

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("engine options")
        for f in fields(cls):
            flag, text = "--" + f.name.replace("_", "-"), (f.metadata["help"] + _default_text(f)).replace("%", "%%")
            if f.type in (bool, "bool"):
                group.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=text)
                continue
            kind = int if "int" in str(f.type) else float if "float" in str(f.type) else str
            group.add_argument(flag, type=kind, default=f.default, choices=f.metadata.get("choices"), help=text)

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "EngineConfig":
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})

    def to_cli_args(self) -> list[str]:
        """These options as command-line flags, for a `fastswitch serve` child process."""
        args = []
        for f in fields(self):
            value, flag = getattr(self, f.name), "--" + f.name.replace("_", "-")
            if isinstance(value, bool):
                args.append(flag if value else flag.replace("--", "--no-", 1))
            elif value is not None:
                args += [flag, str(value)]
        return args


def parse_cores(text: str) -> list[int]:
    """'0-2,5' as [0, 1, 2, 5], checked against the cores this process may use."""
    cores = set()
    try:
        for part in filter(None, text.replace(" ", "").split(",")):
            first, _, last = part.partition("-")
            cores.update(range(int(first), int(last or first) + 1))
    except ValueError:
        raise ValueError(f"invalid cpu_cores={text!r}: core numbers and ranges, e.g. 0-3 or 0,2,4-5") from None
    allowed = os.sched_getaffinity(0)
    if not cores or not cores <= allowed:
        raise ValueError(f"invalid cpu_cores={text!r}: this process may use cores {format_cores(sorted(allowed))}")
    return sorted(cores)


def format_cores(cores: list[int]) -> str:
    """`[0, 1, 2, 5]` as '0-2,5'."""
    runs: list[list[int]] = []
    for core in cores:
        if runs and core == runs[-1][1] + 1:
            runs[-1][1] = core
        else:
            runs.append([core, core])
    return ",".join(f"{a}-{b}" if b > a else str(a) for a, b in runs)


def _default_text(f) -> str:
    return "" if f.default in (None, MISSING) else f" (default: {f.default})"
