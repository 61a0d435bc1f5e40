"""Deterministic random-weight model folders in Hugging Face format, with the tokenizer FastSwitch ships.

They load in this engine, in `transformers` and in vLLM. `tiny` is for tests and the default server;
`0.5b` has Qwen2-0.5B's shape, for realistic compute; `8b` has Llama-3-8B's, for a GPU, written without
weights (they would be 16 GB) and run with `load_format="dummy"`.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "data"
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
ENDOFTEXT, IM_END = 0, 2  # ids of the shipped tokenizer's special tokens (<|im_start|> is 1)

SIZES = {
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=4096, max_position_embeddings=4096),
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192),
}
ARCHS = {
    "llama": dict(architectures=["LlamaForCausalLM"], model_type="llama", rope_theta=500000.0,
                  tie_word_embeddings=False, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                               high_freq_factor=4.0, original_max_position_embeddings=1024)),
    "mistral": dict(architectures=["MistralForCausalLM"], model_type="mistral", rope_theta=1000000.0,
                    tie_word_embeddings=False, sliding_window=None),
    "qwen2": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", rope_theta=1000000.0,
                  tie_word_embeddings=True, use_sliding_window=False),
    "qwen3": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", rope_theta=1000000.0,
                  tie_word_embeddings=True, head_dim=96, attention_bias=False),
}


def demo_config(arch: str, size: str, **overrides) -> dict:
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHS)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose from {', '.join(SIZES)}")
    cfg = dict(hidden_act="silu", rms_norm_eps=1e-6, torch_dtype="bfloat16", bos_token_id=None,
               eos_token_id=IM_END, **SIZES[size], **ARCHS[arch])
    if arch == "qwen3" and size != "tiny":
        cfg["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]
    cfg.update(overrides)
    return cfg


def _random_weights(cfg: dict, seed: int) -> dict:
    """HF-named weights; projections ~ N(0, 1/fan_in) so every layer visibly changes the residual stream."""
    import torch  # here, not at the top: the engine core finds the demo model's path without torch

    h, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    head_dim = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim
    shapes = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,)}
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (vocab, h)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
        })
        if cfg["model_type"] == "qwen2":
            shapes.update({p + f"self_attn.{n}_proj.bias": (s,) for n, s in (("q", q), ("k", kv), ("v", kv))})
        if cfg["model_type"] == "qwen3":
            shapes.update({p + "self_attn.q_norm.weight": (head_dim,), p + "self_attn.k_norm.weight": (head_dim,)})
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            w = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith(".bias"):
            w = 0.1 * torch.randn(shape, generator=gen)
        else:
            w = torch.randn(shape, generator=gen) / shape[-1] ** 0.5
        weights[name] = w.to(getattr(torch, cfg["torch_dtype"]))
    return weights


def write_demo_model(out_dir: str | Path, arch: str = "llama", size: str = "tiny", seed: int = 0, weights: bool = True,
                     **overrides) -> Path:
    """Write a model folder; `overrides` change config.json keys (tests use them). Without `weights` it
    has everything but the safetensors: a shape, to run with `load_format="dummy"`."""
    cfg = demo_config(arch, size, **overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if weights:
        from safetensors.torch import save_file

        save_file(_random_weights(cfg, seed), out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": [IM_END, ENDOFTEXT]}, indent=2))
    shutil.copy(DATA / "tokenizer.json", out / "tokenizer.json")
    tokenizer_config = dict(tokenizer_class="PreTrainedTokenizerFast", chat_template=CHAT_TEMPLATE,
                            eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None,
                            model_max_length=cfg["max_position_embeddings"])
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return out


def default_model_path() -> Path:
    """The tiny demo model used when no model is given, generated once into the cache folder."""
    cache = Path(os.environ.get("FASTSWITCH_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fastswitch")
    path = cache / "demo-llama-tiny"
    if not (path / "model.safetensors").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache))
        write_demo_model(tmp)
        try:
            os.replace(tmp, path)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    return path
