"""Tensor parallelism end to end: two ranks (gloo, a core each) give transformers' greedy tokens on every
architecture and attention backend, also when requests are swapped out and back in at random steps; a
model the ranks cannot split is refused at start-up; a rank that dies ends the streams and the server."""

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest

from fastswitch import LLM, SamplingParams
from fastswitch.model.demo import write_demo_model
from tests.conftest import MODELS
from tests.reference import hf_greedy
from tests.serving import Server, gone, ranks_under
from tests.test_preemption import run_with_random_preemptions

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
pytestmark = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="two ranks need two CPU cores")


@pytest.fixture(scope="module")
def references(model_dirs, prompts):
    return {name: [hf_greedy(model_dirs[name], p, GREEDY.max_tokens) for p in prompts] for name in MODELS}


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("model", MODELS)
def test_two_ranks_match_transformers_with_and_without_preemption(model, backend, model_dirs, prompts, references):
    expected = references[model]
    llm = LLM(model_dirs[model], dtype="float32", device="cpu", attention_backend=backend, num_kv_blocks=128,
              tensor_parallel_size=2)
    try:
        assert [o.token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)] == expected
        assert run_with_random_preemptions(llm, prompts, seed=3) == expected
        stats = llm.engine.stats
        assert stats.swap_out_blocks > 0 and stats.swap_in_blocks > 0 and stats.recompute_fallbacks == 0
    finally:
        llm.engine.core.close()
    assert all(rank.poll() is not None for rank in llm.engine.core.executor.ranks), "a rank outlived close()"


def test_a_two_rank_server_answers_the_openai_client(llama_dir):
    server = Server(llama_dir, "--tensor-parallel-size", "2")
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
        expected = LLM(llama_dir, dtype="float32", device="cpu", num_kv_blocks=64).generate(
            "Tensor parallel", SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)[0]
        reply = client.completions.create(model="tiny", prompt="Tensor parallel", max_tokens=8, temperature=0.0,
                                          extra_body={"ignore_eos": True})
        assert reply.choices[0].text == expected.text and reply.usage.completion_tokens == 8
        streamed = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                  max_tokens=5, stream=True, extra_body={"ignore_eos": True})
        assert sum(bool(chunk.choices and chunk.choices[0].delta.content) for chunk in streamed) >= 1
        assert len(ranks_under(server.proc.pid)) == 2
    finally:
        ranks = ranks_under(server.proc.pid)
        assert server.stop() == 0
    assert all(gone(rank) for rank in ranks), "a rank outlived the server"


def test_kill_9_of_a_rank_mid_stream_ends_the_streams_and_the_server(llama_dir):
    server = Server(llama_dir, "--tensor-parallel-size", "2")
    ranks = ranks_under(server.proc.pid)
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 100000, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        os.kill(ranks[1], signal.SIGKILL)
        killed = time.monotonic()
        rest = [line for line in lines if line.startswith("data: ") and line != "data: [DONE]"]
    assert time.monotonic() - killed < 5
    assert "error" in json.loads(rest[-1][6:])
    assert server.proc.wait(timeout=30) != 0
    assert all(gone(rank) for rank in ranks), "a rank outlived the failure"
    assert "tensor-parallel rank 1 exited" in server.output()


def test_a_model_the_ranks_cannot_split_is_refused_at_start_up(tmp_path):
    model = write_demo_model(tmp_path / "three-heads", hidden_size=192, num_attention_heads=3, num_key_value_heads=1)
    result = subprocess.run([sys.executable, "-m", "fastswitch", "generate", "--model", str(model), "--prompt", "hi",
                             "--tensor-parallel-size", "2"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "tensor_parallel_size=2 does not divide the model's 3 attention heads" in result.stderr
    core = str(sorted(os.sched_getaffinity(0))[0])
    result = subprocess.run([sys.executable, "-m", "fastswitch", "generate", "--prompt", "hi", "--cpu-cores", core,
                             "--tensor-parallel-size", "2"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "tensor_parallel_size=2 needs a CPU core per rank; 1 available" in result.stderr


def test_the_engine_core_imports_no_torch():
    modules = ["fastswitch.engine.core", "fastswitch.engine.core_process", "fastswitch.engine.scheduler",
               "fastswitch.kv.manager", "fastswitch.sim.simulator"]
    code = f"import sys\nimport {', '.join(modules)}\nprint('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
