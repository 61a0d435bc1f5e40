"""The engine in one process: prompts in, one scheduling iteration per `step()`, outputs out.

    engine = Engine(EngineConfig(model=DIR))
    engine.add_request("Hello", SamplingParams(max_tokens=8))
    while engine.has_unfinished_requests():
        for out in engine.step(): ...

The core (`engine/core.py`) works in token ids; this puts the tokenizer on both sides of it, as the
API server does across a process boundary. `LLM` and the offline benchmark runner use it.
"""

import itertools

from fastswitch.config import EngineConfig
from fastswitch.engine.core import EngineCore
from fastswitch.engine.inputs import InputProcessor, Prompt
from fastswitch.engine.outputs import OutputProcessor, RequestOutput
from fastswitch.model.demo import default_model_path
from fastswitch.model.tokenizer import Tokenizer
from fastswitch.sampling import SamplingParams
from fastswitch.stats import EngineStats

__all__ = ["Engine", "Prompt"]


class Engine:
    def __init__(self, config: EngineConfig, core: EngineCore | None = None, tokenizer: Tokenizer | None = None):
        self.config = config
        self.core = core or EngineCore.from_config(config)
        self.tokenizer = tokenizer or Tokenizer(config.model or default_model_path())
        self.inputs = InputProcessor(self.tokenizer, self.core.limits)
        self.outputs = OutputProcessor(self.tokenizer)
        self._ids = itertools.count()

    def add_request(self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None,
                    arrival_time: float | None = None, priority: int = 0, user: str | None = None) -> str:
        """Queue a request; raises ValueError, before anything is queued, if it cannot be served.

        `priority`: lower is served first (policy `priority`); `user`: whose fair share it counts
        against (policy `vtc`)."""
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        add, text = self.inputs.process(prompt, params, request_id, arrival_time or self.core.clock.now(), priority,
                                        user)
        self.core.add_request(add)
        self.outputs.add(add, text)
        return request_id

    def abort(self, request_id: str) -> None:
        self.core.abort([request_id])
        self.outputs.abort(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests()

    def set_priority(self, request_id: str, priority: int) -> bool:
        """Change a queued or running request's priority (lower is served first); False if it is not here."""
        return self.core.set_priority(request_id, priority)

    def preempt(self, request_id: str, mode: str | None = None) -> bool:
        """Pause a running request now (by swap or recompute; default: preemption_mode); False if it is
        not running, or its KV is still being copied in."""
        return self.core.preempt(request_id, mode)

    @property
    def stats(self) -> EngineStats:
        return self.core.stats

    def kv_stats(self) -> dict:
        return self.core.kv_stats()

    def step(self) -> list[RequestOutput]:
        """One iteration: schedule, run the model, and report every request that produced a token."""
        outputs, stopped = self.outputs.process(self.core.step())
        if stopped:
            self.core.abort(stopped)
        return outputs
