"""Build the model on its device and fill it from a Hugging Face folder's safetensors shards (or, for
`load_format="dummy"`, with random weights)."""

import contextlib
import logging
from pathlib import Path

import torch
from safetensors import safe_open

from fastswitch.model.config import ModelConfig, ModelError
from fastswitch.model.llama import CausalLM

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
               seed: int = 0) -> CausalLM:
    with torch.device(device), _default_dtype(dtype):
        model = CausalLM(cfg, max_len)
    if dummy:
        _fill_random(model, seed)
        log.info("random weights (load_format dummy) for %s (%s) as %s on %s", cfg.path, cfg.arch, dtype, device)
    else:
        _fill_from_safetensors(model, cfg, device)
    if device.type == "cpu":
        _prepack(model)
    return model.eval()


def _fill_random(model: CausalLM, seed: int) -> None:
    """Projections ~ N(0, 1/fan_in), norms near 1: activations stay in range, as in a trained model."""
    gen = torch.Generator(model.embed_tokens.device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.normal_(1.0, 0.1, generator=gen)
        elif param.dim() == 1:
            param.normal_(0.0, 0.1, generator=gen)
        else:
            param.normal_(0.0, param.shape[-1] ** -0.5, generator=gen)


def _fill_from_safetensors(model: CausalLM, cfg: ModelConfig, device: torch.device) -> None:
    params = dict(model.named_parameters())
    filled: set[str] = set()
    files = sorted(Path(cfg.path).glob("*.safetensors"))
    for file in files:
        with safe_open(file, framework="pt", device=str(device)) as shard:
            for hf_name in shard.keys():
                target = _target(hf_name, cfg)
                if target is None:
                    continue
                name, piece = target
                if name not in params:
                    raise ModelError(f"{file.name}: unexpected weight {hf_name}")
                _copy_piece(params[name], shard.get_tensor(hf_name), piece, cfg, name)
                filled.add(name if piece is None else f"{name}#{piece}")
    _check_complete(params, filled)
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


def _copy_piece(param: torch.Tensor, tensor: torch.Tensor, piece: int | None, cfg: ModelConfig, name: str):
    if piece is not None:
        sizes = (
            [cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim]
            if "qkv_proj" in name
            else [cfg.intermediate_size, cfg.intermediate_size]
        )
        param = param.narrow(0, sum(sizes[:piece]), sizes[piece])
    if param.shape != tensor.shape:
        raise ModelError(f"weight {name} has shape {tuple(tensor.shape)}, config implies {tuple(param.shape)}")
    param.copy_(tensor)


def _check_complete(params: dict, filled: set[str]):
    for name in params:
        pieces = 3 if "qkv_proj" in name else 2 if "gate_up_proj" in name else None
        wanted = {name} if pieces is None else {f"{name}#{i}" for i in range(pieces)}
        if not wanted <= filled:
            raise ModelError(f"the checkpoint has no weights for {name}")
