"""The Engine API: stop conditions, streaming, requests joining and leaving, aborts, timings, bad input."""

import json
import shutil

import pytest

from fastswitch import LLM, Engine, EngineConfig, SamplingParams
from fastswitch.model.config import ModelError

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(llama_dir):
    return LLM(llama_dir, dtype="float32", device="cpu", num_kv_blocks=256)


def greedy(llm, prompt, **kw):
    return llm.generate([prompt], SamplingParams(**{**GREEDY, **kw}), use_tqdm=False)[0]


def test_text_token_and_chat_prompts(llm):
    tok = llm.engine.tokenizer
    by_text = greedy(llm, "Return the number of items", max_tokens=8)
    by_ids = greedy(llm, tok.encode("Return the number of items"), max_tokens=8)
    assert by_text.token_ids == by_ids.token_ids
    assert by_text.text == tok.decode(by_text.token_ids)
    assert by_ids.prompt is None and by_text.prompt == "Return the number of items"
    chat = [{"role": "user", "content": "hi"}]
    by_chat = greedy(llm, chat, max_tokens=8)
    expected = tok.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    assert by_chat.prompt_token_ids == expected
    assert by_chat.token_ids == greedy(llm, expected, max_tokens=8).token_ids


def test_max_tokens_and_context_limit_end_with_length(llama_dir):
    small = LLM(llama_dir, dtype="float32", device="cpu", num_kv_blocks=64, max_model_len=40)
    out = small.generate([[5] * 30], SamplingParams(**GREEDY, max_tokens=None), use_tqdm=False)[0]
    assert len(out.token_ids) == 10 and out.finish_reason == "length"
    out = small.generate([[5] * 30], SamplingParams(**GREEDY, max_tokens=3), use_tqdm=False)[0]
    assert len(out.token_ids) == 3 and out.finish_reason == "length"


def test_stop_token_ids_end_the_request_at_their_first_occurrence(llm, prompts):
    full = greedy(llm, prompts[4], max_tokens=24)
    stop = full.token_ids[5]
    first = full.token_ids.index(stop)
    out = greedy(llm, prompts[4], max_tokens=24, stop_token_ids=[stop])
    assert out.token_ids == full.token_ids[: first + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)


def test_eos_from_generation_config_stops_unless_ignored(llm, prompts, llama_dir, tmp_path):
    full = greedy(llm, prompts[4], max_tokens=24)
    eos = full.token_ids[6]
    folder = shutil.copytree(llama_dir, tmp_path / "model")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos]}))
    with_eos = LLM(str(folder), dtype="float32", device="cpu", num_kv_blocks=64)
    stopped, ignored, late = with_eos.generate([prompts[4]] * 3, [
        SamplingParams(temperature=0, max_tokens=24),
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=24, min_tokens=10),
    ], use_tqdm=False)
    assert stopped.token_ids == full.token_ids[: full.token_ids.index(eos) + 1] and stopped.finish_reason == "stop"
    assert ignored.token_ids == full.token_ids
    assert eos not in late.token_ids[:10] and len(late.token_ids) >= 10  # min_tokens masks EOS


def test_stop_strings_cut_the_text(llm, prompts):
    full = greedy(llm, prompts[5], max_tokens=24)
    stop = full.text[10:13]
    at = full.text.index(stop)
    out = greedy(llm, prompts[5], max_tokens=24, stop=[stop])
    assert out.text == full.text[:at]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)
    kept = greedy(llm, prompts[5], max_tokens=24, stop=[stop], include_stop_str_in_output=True)
    assert kept.text == full.text[: at + len(stop)]


def test_streamed_deltas_add_up_and_never_leak_a_stop_string(llm, prompts):
    full = greedy(llm, prompts[5], max_tokens=24)
    stop = full.text[10:13]
    engine = llm.engine
    request_id = engine.add_request(prompts[5], SamplingParams(**GREEDY, max_tokens=24, stop=[stop]))
    texts, tokens = [], []
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id == request_id
            texts.append(out.new_text)
            tokens += out.new_token_ids
            assert stop not in "".join(texts)
    assert "".join(texts) == out.text == full.text[: full.text.index(stop)]
    assert tokens == out.token_ids


def test_requests_join_and_leave_between_steps(llm, prompts):
    alone = {i: greedy(llm, prompts[i], max_tokens=12).token_ids for i in range(4)}
    engine = llm.engine
    done = {}
    ids = {engine.add_request(prompts[0], SamplingParams(**GREEDY, max_tokens=12)): 0}
    for step in range(200):
        if step in (2, 5, 9):  # arrivals while others are running
            ids[engine.add_request(prompts[len(ids)], SamplingParams(**GREEDY, max_tokens=12))] = len(ids)
        for out in engine.step():
            if out.finished:
                done[ids[out.request_id]] = out.token_ids
        if len(done) == 4:
            break
    assert done == alone


def test_abort_frees_memory_and_spares_the_others(llm, prompts):
    engine = llm.engine
    keep = engine.add_request(prompts[3], SamplingParams(**GREEDY, max_tokens=10))
    drop = engine.add_request(prompts[6], SamplingParams(**GREEDY, max_tokens=10))
    engine.step()
    assert engine.core.kv.device.num_available < engine.core.kv.num_blocks
    engine.abort(drop)
    finished = []
    while engine.has_unfinished_requests():
        finished += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in finished] == [keep]
    assert finished[0].token_ids == greedy(llm, prompts[3], max_tokens=10).token_ids
    assert engine.core.kv.device.num_available == engine.core.kv.num_blocks


def test_kv_statistics(llama_dir, prompts):
    engine = LLM(llama_dir, dtype="float32", device="cpu", num_kv_blocks=256).engine
    for p in prompts[:4]:
        engine.add_request(p, SamplingParams(**GREEDY, max_tokens=4))
    engine.step()
    stats = engine.kv_stats()
    assert stats["groups_per_request"] == 1.0  # a fresh, roomy pool: every request in one contiguous group
    assert 0 < stats["device_free_blocks"] < stats["device_blocks"]
    assert stats["device_largest_free_group"] & (stats["device_largest_free_group"] - 1) == 0  # a power of two


def test_per_request_timings(llm, prompts):
    out = greedy(llm, prompts[2], max_tokens=5)
    m = out.metrics
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finish_time
    assert len(m.token_times) == 5 and m.token_times == sorted(m.token_times)
    assert m.token_times[0] == m.first_token_time


def test_logprobs_come_with_each_token(llm, prompts):
    out = greedy(llm, prompts[2], max_tokens=4, logprobs=3)
    assert len(out.logprobs) == 4
    for token, entry in zip(out.token_ids, out.logprobs):
        assert token in entry and len(entry) == 3  # greedy picks the top token, one of the three
        assert entry[token] == max(entry.values())


@pytest.mark.parametrize("prompt, message", [
    ("", "empty"),
    ([], "empty"),
    ([1, 2, 999999], "out of range"),
    ([3] * 5000, "context limit"),
    (42, "a prompt is"),
])
def test_bad_prompts_are_refused_before_any_work(llm, prompt, message, prompts):
    engine = llm.engine
    ok = engine.add_request(prompts[1], SamplingParams(**GREEDY, max_tokens=4))
    with pytest.raises(ValueError, match=message):
        engine.add_request(prompt, SamplingParams(max_tokens=4))
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert [o.request_id for o in outputs if o.finished] == [ok]
    assert engine.core.kv.device.num_available == engine.core.kv.num_blocks


def test_generate_refuses_a_batch_with_one_bad_prompt_and_runs_nothing(llm, prompts):
    with pytest.raises(ValueError, match="empty"):
        llm.generate([prompts[0], ""], SamplingParams(max_tokens=4), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


def test_a_request_larger_than_the_pool_is_refused(llama_dir):
    llm = LLM(llama_dir, dtype="float32", device="cpu", num_kv_blocks=4)
    with pytest.raises(ValueError, match="KV blocks"):
        llm.generate([[5] * 60], SamplingParams(max_tokens=10), use_tqdm=False)


def test_model_folder_errors(tmp_path, llama_dir):
    with pytest.raises(ModelError, match="not found"):
        Engine(EngineConfig(model=str(tmp_path / "nope"), device="cpu"))
    broken = tmp_path / "broken"
    shutil.copytree(llama_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ModelError, match="unsupported architecture"):
        Engine(EngineConfig(model=str(broken), device="cpu"))
    (broken / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 5}))
    with pytest.raises(ModelError, match="no weights for layers.4"):
        Engine(EngineConfig(model=str(broken), device="cpu", num_kv_blocks=8))
    (broken / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="safetensors"):
        Engine(EngineConfig(model=str(broken), device="cpu"))


@pytest.mark.parametrize("bad, message", [
    (dict(dtype="int8"), "dtype"),
    (dict(device="tpu"), "device"),
    (dict(block_size=0), "block_size"),
    (dict(max_num_seqs=-1), "max_num_seqs"),
    (dict(max_model_len=10**6), "max_model_len"),
])
def test_bad_engine_options(llama_dir, bad, message):
    with pytest.raises(ValueError, match=message):
        Engine(EngineConfig(model=llama_dir, **bad))
