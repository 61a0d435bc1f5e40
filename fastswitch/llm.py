"""Offline generation, as in vLLM: LLM(model=DIR, **engine_options).generate(prompts, params)."""

from tqdm import tqdm

from fastswitch.config import EngineConfig
from fastswitch.engine.engine import Engine, Prompt
from fastswitch.engine.outputs import RequestOutput
from fastswitch.sampling import SamplingParams


class LLM:
    def __init__(self, model: str | None = None, **engine_options):
        self.engine = Engine(EngineConfig(model=model, **engine_options))

    def generate(self, prompts: Prompt | list[Prompt], sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True, priority: list[int] | None = None, users: list[str] | None = None) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in the order of the prompts.

        A prompt is a string, a list of token ids, or a chat (a list of {"role", "content"} messages).
        `priority` (lower first, policy `priority`) and `users` (policy `vtc`) give one value per prompt.
        If any prompt or parameter is invalid, ValueError is raised and nothing runs.
        """
        prompts = _as_list(prompts)
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params or SamplingParams()] * len(prompts)
        priority, users = priority or [0] * len(prompts), users or [""] * len(prompts)
        if not len(params) == len(priority) == len(users) == len(prompts):
            raise ValueError(f"{len(prompts)} prompts need as many sampling parameters, priorities and users")
        ids = []
        try:
            for prompt, p, rank, user in zip(prompts, params, priority, users):
                ids.append(self.engine.add_request(prompt, p, priority=rank, user=user))
        except ValueError:
            for request_id in ids:
                self.engine.abort(request_id)
            raise
        finished: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="generating", unit="req", disable=not use_tqdm) as bar:
            while len(finished) < len(ids):
                for out in self.engine.step():
                    if out.finished:
                        finished[out.request_id] = out
                        bar.update(1)
        return [finished[i] for i in ids]


def _as_list(prompts) -> list[Prompt]:
    """One prompt (text, token ids, or chat) or a list of them -> a list of prompts."""
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, list) and prompts and all(isinstance(x, (int, dict)) for x in prompts):
        return [prompts]
    return list(prompts)
