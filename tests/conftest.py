import random

import pytest

from fastswitch.model.demo import write_demo_model

# Every architecture, plus the variants that exercise other code paths: MQA, untied Qwen2.
MODELS = {
    "llama": dict(arch="llama"),  # GQA, llama3 rope scaling, untied
    "llama-mqa": dict(arch="llama", num_key_value_heads=1),
    "mistral": dict(arch="mistral"),
    "qwen2": dict(arch="qwen2"),  # qkv bias, tied
    "qwen2-untied": dict(arch="qwen2", tie_word_embeddings=False),
    "qwen3": dict(arch="qwen3"),  # q/k norm, explicit head_dim != hidden / heads
}
PROMPT_LENGTHS = [1, 3, 17, 64, 100, 150, 255, 300]


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {name: str(write_demo_model(root / name, **kw)) for name, kw in MODELS.items()}


@pytest.fixture(scope="session")
def llama_dir(model_dirs):
    return model_dirs["llama"]


@pytest.fixture(scope="session")
def prompts():
    """Mixed-length token-id prompts, 1 to 300 tokens, from the shipped tokenizer's ordinary ids."""
    rng = random.Random(1234)
    return [[rng.randrange(3, 4000) for _ in range(n)] for n in PROMPT_LENGTHS]
