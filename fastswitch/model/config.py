"""What the engine needs to know about a Hugging Face model folder, read from its config.json."""

import json
from dataclasses import dataclass
from pathlib import Path

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
ROPE_TYPES = ("default", "linear", "llama3")


class ModelError(ValueError):
    """The model folder is missing, incomplete, or describes something this engine cannot run."""


@dataclass(frozen=True)
class ModelConfig:
    path: str
    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    qkv_bias: bool
    o_bias: bool
    qk_norm: bool
    tie_word_embeddings: bool
    sliding_window: int | None
    torch_dtype: str
    eos_token_ids: tuple[int, ...]

    @classmethod
    def from_folder(cls, path: str | Path, need_weights: bool = True) -> "ModelConfig":
        """`need_weights=False`: the shape alone (a folder with only config.json will do, e.g. for the simulator)."""
        folder = Path(path)
        if not folder.is_dir():
            raise ModelError(f"model folder not found: {folder}")
        if not (folder / "config.json").is_file():
            raise ModelError(f"{folder} has no config.json: not a Hugging Face model folder")
        if need_weights and not any(folder.glob("*.safetensors")):
            raise ModelError(f"{folder} has no *.safetensors weights")
        hf = json.loads((folder / "config.json").read_text())
        names = hf.get("architectures") or []
        arch = next((ARCHITECTURES[n] for n in names if n in ARCHITECTURES), None)
        if arch is None:
            raise ModelError(
                f"unsupported architecture {names or '(none given)'}; supported: {', '.join(ARCHITECTURES)}"
            )
        if hf.get("hidden_act", "silu") != "silu":
            raise ModelError(f"unsupported hidden_act {hf['hidden_act']!r}: only silu")
        num_heads = hf["num_attention_heads"]
        attention_bias = hf.get("attention_bias", False)
        theta, scaling = _rope(hf)
        return cls(
            path=str(folder),
            arch=arch,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            qkv_bias=True if arch == "qwen2" else attention_bias,
            o_bias=False if arch == "qwen2" else attention_bias,
            qk_norm=arch == "qwen3",
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            sliding_window=_sliding_window(hf),
            torch_dtype=hf.get("torch_dtype") or hf.get("dtype") or "bfloat16",
            eos_token_ids=_eos_token_ids(folder, hf),
        )


def _rope(hf: dict) -> tuple[float, dict | None]:
    """rope_theta and scaling, from either the classic keys or transformers 5's rope_parameters."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ModelError(f"unsupported rope type {rope_type!r}; supported: {', '.join(ROPE_TYPES)}")
    return float(theta), (None if rope_type == "default" else {**params, "rope_type": rope_type})


def _sliding_window(hf: dict) -> int | None:
    if hf.get("use_sliding_window") is False:
        return None
    return hf.get("sliding_window")


def _eos_token_ids(folder: Path, hf: dict) -> tuple[int, ...]:
    generation = folder / "generation_config.json"
    eos = json.loads(generation.read_text()).get("eos_token_id") if generation.is_file() else None
    if eos is None:
        eos = hf.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (eos,)
