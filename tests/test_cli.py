"""The `fastswitch` command and the demo models it writes."""

import subprocess
import sys
from dataclasses import fields

import pytest

from fastswitch.cli import main
from fastswitch.config import EngineConfig
from fastswitch.model.tokenizer import Tokenizer


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exit:
        code = exit.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_demo_model_is_deterministic_per_seed(tmp_path, capsys):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        code, out, _ = run_cli(capsys, "demo-model", str(tmp_path / name), "--arch", "qwen3", "--seed", str(seed))
        assert code == 0 and "qwen3 tiny" in out
    weights = {n: (tmp_path / n / "model.safetensors").read_bytes() for n in "abc"}
    assert weights["a"] == weights["b"] != weights["c"]
    assert len(weights["a"]) < 20 * 2**20  # a few MB


def test_demo_tokenizer_and_chat_template_agree_with_transformers(llama_dir):
    from transformers import AutoTokenizer

    theirs, ours = AutoTokenizer.from_pretrained(llama_dir), Tokenizer(llama_dir)
    text = "Hello, world! Ünïcode 日本語 and code: def f(x): return x**2"
    assert theirs.encode(text) == ours.encode(text)
    assert ours.decode(ours.encode(text)) == text
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert theirs.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == ours.apply_chat_template(chat)


def test_generate_prints_completions(capsys, llama_dir):
    code, out, _ = run_cli(capsys, "generate", "--model", llama_dir, "--device", "cpu", "--dtype", "float32",
                           "--num-kv-blocks", "64", "--prompt", "hello", "--prompt", "world", "--max-tokens", "5",
                           "--ignore-eos")
    assert code == 0
    assert out.count("[5 tokens, length]") == 2 and "2 requests, 10 tokens" in out


@pytest.mark.parametrize("argv, message", [
    (["generate", "--model", "/no/such/folder"], "model folder not found"),
    (["generate", "--temperature", "-1"], "temperature"),
    (["generate", "--num-kv-blocks", "0"], "num_kv_blocks"),
    (["generate", "--dtype", "int8"], "invalid choice"),
    (["demo-model", "x", "--size", "7b"], "invalid choice"),
    (["generate", "--slo-ttft", "0=fast"], "invalid slo_ttft entry '0=fast'"),
    (["generate", "--slo-tbt", "1=-2"], "a target must be > 0 seconds"),
    (["generate", "--shed", "2=soon"], "invalid shed entry '2=soon'"),
])
def test_bad_input_is_one_line_and_exit_code_2(capsys, argv, message, llama_dir):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert message in err
    assert "Traceback" not in err


def test_help_explains_every_engine_option(capsys):
    code, out, _ = run_cli(capsys, "generate", "--help")
    assert code == 0
    for f in fields(EngineConfig):
        assert "--" + f.name.replace("_", "-") in out


def test_module_entry_point(llama_dir):
    result = subprocess.run([sys.executable, "-m", "fastswitch", "generate", "--model", llama_dir, "--device", "cpu",
                             "--num-kv-blocks", "64", "--max-tokens", "2"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "3 requests, 6 tokens" in result.stdout


def test_default_model_is_generated_once(tmp_path, monkeypatch):
    from fastswitch.model.demo import default_model_path

    monkeypatch.setenv("FASTSWITCH_CACHE", str(tmp_path))
    path = default_model_path()
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert default_model_path() == path and (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert (path / "tokenizer.json").is_file()
