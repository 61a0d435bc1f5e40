"""Tensor parallelism across machines, as two nodes on loopback: the engine on node 0 with its rank, and
`fastswitch ranks --node-rank 1` with the other, meeting over TCP at --dist-init-addr. The tokens are
transformers' greedy ones, also with swaps; a node's rank that dies fails the engine; an engine that
goes stops the other node's ranks; wrong node options are refused with one line."""

import os
import signal
import subprocess
import sys

import pytest

from fastswitch import LLM, SamplingParams
from fastswitch.interfaces import ExecutorDied
from tests.reference import hf_greedy
from tests.serving import free_port, gone, ranks_under
from tests.test_preemption import run_with_random_preemptions

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
pytestmark = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="two ranks need two CPU cores")


def nodes(port: int) -> list[str]:
    return ["--tensor-parallel-size", "2", "--nnodes", "2", "--dist-init-addr", f"127.0.0.1:{port}"]


def start_node_1(model_dir: str, port: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fastswitch", "ranks", "--model", model_dir, "--dtype", "float32",
                             "--device", "cpu", "--num-kv-blocks", "128", *nodes(port), "--node-rank", "1"])


def engine_on_node_0(model_dir: str, port: int) -> LLM:
    return LLM(model_dir, dtype="float32", device="cpu", num_kv_blocks=128, tensor_parallel_size=2, nnodes=2,
               dist_init_addr=f"127.0.0.1:{port}")


def test_ranks_on_two_nodes_match_transformers_and_end_with_the_engine(llama_dir, prompts):
    port = free_port(following=3)
    node_1 = start_node_1(llama_dir, port)
    try:
        llm = engine_on_node_0(llama_dir, port)
        expected = [hf_greedy(llama_dir, p, GREEDY.max_tokens) for p in prompts]
        assert [o.token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)] == expected
        assert run_with_random_preemptions(llm, prompts, seed=5) == expected
        assert llm.engine.stats.swap_out_blocks > 0
        llm.engine.core.close()
        assert node_1.wait(timeout=60) == 0
    finally:
        node_1.kill()


def test_a_rank_lost_on_another_node_fails_the_engine(llama_dir, prompts):
    port = free_port(following=3)
    node_1 = start_node_1(llama_dir, port)
    try:
        llm = engine_on_node_0(llama_dir, port)
        (rank_1,) = ranks_under(node_1.pid)
        os.kill(rank_1, signal.SIGKILL)
        with pytest.raises(ExecutorDied, match="rank 1"):
            llm.generate(prompts, GREEDY, use_tqdm=False)
        assert node_1.wait(timeout=30) == 1
        assert all(rank.poll() is not None for rank in llm.engine.core.executor.ranks), "rank 0 outlived the failure"
    finally:
        node_1.kill()


def test_an_engine_that_goes_stops_the_other_nodes_ranks(llama_dir):
    port = free_port(following=3)
    node_1 = start_node_1(llama_dir, port)
    engine = subprocess.Popen([sys.executable, "-m", "fastswitch", "--log-level", "info", "generate", "--model",
                               llama_dir, "--prompt", "hi", "--max-tokens", "1000000", "--ignore-eos", "--dtype",
                               "float32", "--device", "cpu", "--num-kv-blocks", "128", *nodes(port)],
                              stderr=subprocess.PIPE, text=True)
    try:
        for line in engine.stderr:  # until both ranks are up and the engine generates
            if "tensor parallel: 2 ranks ready" in line:
                break
        ranks = ranks_under(node_1.pid)
        assert len(ranks) == 1
        engine.kill()
        assert node_1.wait(timeout=60) == 1
        assert all(gone(rank) for rank in ranks + ranks_under(node_1.pid)), "a rank outlived its engine"
    finally:
        engine.kill()
        node_1.kill()


@pytest.mark.parametrize("options, message", [
    (["--nnodes", "2", "--tensor-parallel-size", "2"], "invalid dist_init_addr=None: nnodes=2 needs node 0's HOST:PORT"),
    (["--nnodes", "2", "--tensor-parallel-size", "3", "--dist-init-addr", "h:1"],
     "tensor_parallel_size=3 does not divide over nnodes=2"),
    (["--nnodes", "2", "--node-rank", "2", "--tensor-parallel-size", "2", "--dist-init-addr", "h:1"],
     "invalid node_rank=2: from 0 to nnodes - 1 (1)"),
])
def test_wrong_node_options_are_refused_with_one_line(options, message):
    result = subprocess.run([sys.executable, "-m", "fastswitch", "generate", "--prompt", "hi", *options],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_the_engine_runs_on_node_0_and_fastswitch_ranks_on_the_others():
    engine = subprocess.run([sys.executable, "-m", "fastswitch", "generate", "--prompt", "hi", *nodes(1234),
                             "--node-rank", "1"], capture_output=True, text=True, timeout=120)
    assert engine.returncode == 2 and "the engine runs on node 0" in engine.stderr
    ranks = subprocess.run([sys.executable, "-m", "fastswitch", "ranks", *nodes(1234)], capture_output=True,
                           text=True, timeout=120)
    assert ranks.returncode == 2 and "node 0 runs the engine itself" in ranks.stderr
