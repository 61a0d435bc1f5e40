"""Build the model on its device and fill it from a Hugging Face folder's safetensors shards (or, for
`load_format="dummy"`, with random weights). With tensor parallelism, each rank reads only its part of every
weight (model/parallel.py) and keeps its shards."""

import contextlib
import logging
from pathlib import Path

import torch
from safetensors import safe_open

from fastswitch.model.config import ModelConfig, ModelError
from fastswitch.model.llama import CausalLM
from fastswitch.model.parallel import Shard

log = logging.getLogger(__name__)

# HF name part -> (our fused parameter, index of the HF piece inside it)
FUSED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def load_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, max_len: int, dummy: bool = False,
               seed: int = 0, shard: Shard = Shard()) -> CausalLM:
    shard.check(cfg)
    with torch.device(device), _default_dtype(dtype):
        model = CausalLM(cfg, max_len, shard)
    if dummy:
        _fill_random(model, cfg, seed, shard)
        log.info("random weights (load_format dummy) for %s (%s) as %s on %s", cfg.path, cfg.arch, dtype, device)
    else:
        _fill_from_safetensors(model, cfg, device, shard)
    if device.type == "cpu":
        _prepack(model)
    return model.eval()


def _fill_random(model: CausalLM, cfg: ModelConfig, seed: int, shard: Shard) -> None:
    """Projections ~ N(0, 1/fan_in), norms near 1: activations stay in range, as in a trained model. A shard
    draws the whole TP=1 tensor and keeps its part: every tensor-parallel size runs the same model."""
    gen = torch.Generator(model.embed_tokens.device).manual_seed(seed)
    whole = _whole_parameters(cfg)
    for name, param in model.named_parameters():
        if shard.size == 1:
            _draw(param, name, gen)
            continue
        drawn = _draw(torch.empty(whole[name].shape, dtype=param.dtype, device=param.device), name, gen)
        sizes = _piece_sizes(cfg, name, Shard())
        for piece in [None] if sizes is None else range(len(sizes)):
            _copy_piece(param, _piece(drawn, piece, sizes), piece, cfg, name, shard, whole[name])


def _draw(tensor: torch.Tensor, name: str, gen: torch.Generator) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return tensor.normal_(1.0, 0.1, generator=gen)
    if tensor.dim() == 1:
        return tensor.normal_(0.0, 0.1, generator=gen)
    return tensor.normal_(0.0, tensor.shape[-1] ** -0.5, generator=gen)


def _fill_from_safetensors(model: CausalLM, cfg: ModelConfig, device: torch.device, shard: Shard) -> None:
    params, whole = dict(model.named_parameters()), _whole_parameters(cfg)
    filled: set[str] = set()
    files = sorted(Path(cfg.path).glob("*.safetensors"))
    for file in files:
        with safe_open(file, framework="pt", device=str(device)) as f:
            for hf_name in f.keys():
                target = _target(hf_name, cfg)
                if target is None:
                    continue
                name, piece = target
                if name not in params:
                    raise ModelError(f"{file.name}: unexpected weight {hf_name}")
                _copy_piece(params[name], f.get_slice(hf_name), piece, cfg, name, shard, whole[name])
                filled.add(name if piece is None else f"{name}#{piece}")
    _check_complete(params, filled, cfg)
    log.info("loaded %s (%s, %d shards) on %s", cfg.path, cfg.arch, len(files), device)


def _prepack(model: CausalLM) -> None:
    if not torch.backends.mkldnn.is_available():
        log.info("oneDNN unavailable: linear weights stay in torch's layout")
        return
    try:
        model.prepack()
    except RuntimeError as e:  # a CPU or dtype oneDNN cannot pack for: the plain matmuls still work
        log.warning("linear weights not prepacked for oneDNN (%s)", str(e).splitlines()[0])


def _target(hf_name: str, cfg: ModelConfig) -> tuple[str, int | None] | None:
    """Our parameter name and fused piece for an HF weight name; None for weights we do not use."""
    if "rotary_emb" in hf_name or (hf_name == "lm_head.weight" and cfg.tie_word_embeddings):
        return None
    name = hf_name.removeprefix("model.")
    if name in ("embed_tokens.weight", "lm_head.weight"):
        return name.removesuffix(".weight"), None
    parts = name.split(".")
    if len(parts) >= 2 and parts[-2] in FUSED:
        fused, piece = FUSED[parts[-2]]
        return ".".join(parts[:-2] + [fused, parts[-1]]), piece
    return name, None


def _whole_parameters(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The TP=1 model's parameters, shapes without storage."""
    with torch.device("meta"):
        return dict(CausalLM(cfg, 1).named_parameters())


def _piece_sizes(cfg: ModelConfig, name: str, shard: Shard) -> list[int] | None:
    """Rows of each HF weight fused into parameter `name` on `shard`; None for a weight of one piece."""
    if "qkv_proj" in name:
        q, kv = shard.heads(cfg) * cfg.head_dim, shard.kv_heads(cfg) * cfg.head_dim
        return [q, kv, kv]
    if "gate_up_proj" in name:
        return [shard.intermediate_size(cfg)] * 2
    return None


def _piece(tensor: torch.Tensor, piece: int | None, sizes: list[int] | None) -> torch.Tensor:
    return tensor if piece is None else tensor.narrow(0, sum(sizes[:piece]), sizes[piece])


def _copy_piece(param: torch.Tensor, source, piece: int | None, cfg: ModelConfig, name: str, shard: Shard,
                whole: torch.Tensor):
    """Copy this shard's part of one HF weight, `source` (a tensor or a safetensors slice, read only in part),
    into its place in `param`; `whole` is the TP=1 parameter (on the meta device), for the shape check."""
    expected = tuple(_piece(whole, piece, _piece_sizes(cfg, name, Shard())).shape)
    shape = tuple(source.shape) if isinstance(source, torch.Tensor) else tuple(source.get_shape())
    if shape != expected:
        raise ModelError(f"weight {name} has shape {shape}, config implies {expected}")
    target = _piece(param, piece, _piece_sizes(cfg, name, shard))
    part = shard.part(cfg, name, piece)
    if part is None:
        target.copy_(source[...])
        return
    dim, start, length = part
    index = (slice(None),) * dim + (slice(start, start + length),)
    target.narrow(dim, 0, length).copy_(source[index])  # short of the target only in the vocabulary's padding


def _check_complete(params: dict, filled: set[str], cfg: ModelConfig):
    for name in params:
        sizes = _piece_sizes(cfg, name, Shard())
        wanted = {name} if sizes is None else {f"{name}#{i}" for i in range(len(sizes))}
        if not wanted <= filled:
            raise ModelError(f"the checkpoint has no weights for {name}")
