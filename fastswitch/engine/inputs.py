"""A prompt (text, token ids or a chat) -> the core's AddRequest, refusing what cannot be served.

It runs where the tokenizer is: in the API server's process, or beside an in-process core. It
checks against the core's `Limits`, so a refusal never costs a round trip to the core.
"""

from fastswitch.messages import AddRequest, Limits
from fastswitch.model.tokenizer import Tokenizer
from fastswitch.sampling import SamplingParams

Prompt = str | list[int] | list[dict]


class InputProcessor:
    def __init__(self, tokenizer: Tokenizer, limits: Limits):
        self.tokenizer, self.limits = tokenizer, limits

    def process(self, prompt: Prompt, params: SamplingParams | None, request_id: str, arrival_time: float,
                priority: int = 0, user: str | None = None) -> tuple[AddRequest, str | None]:
        """The request for the core and the prompt's text (None for token ids); ValueError if it cannot be served.

        `priority`: lower is served first (policy `priority`); `user`: whose fair share it counts
        against (policy `vtc`)."""
        params = params or SamplingParams()
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise ValueError(f"invalid priority {priority!r}: must be an integer")
        text, token_ids = self._tokenize(prompt)
        self._check_fits(token_ids, params)
        return AddRequest(request_id, token_ids, params, arrival_time, priority, user or ""), text

    def _tokenize(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
            text = self.tokenizer.apply_chat_template(prompt)
            return text, self.tokenizer.encode(text, add_special_tokens=False)
        if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            bad = [t for t in prompt if not 0 <= t < self.limits.vocab_size]
            if bad:
                raise ValueError(f"prompt token ids out of range [0, {self.limits.vocab_size}): {bad[:5]}")
            return None, list(prompt)
        raise ValueError("a prompt is a string, a list of token ids, or a list of chat messages")

    def _check_fits(self, token_ids: list[int], params: SamplingParams) -> None:
        limit = self.limits.max_model_len
        if not token_ids:
            raise ValueError("the prompt is empty")
        if len(token_ids) >= limit:
            raise ValueError(f"the prompt has {len(token_ids)} tokens; the context limit is {limit}, "
                             "and at least one token must be generated")
        longest = min(len(token_ids) + (params.max_tokens or limit), limit)
        blocks = -(-longest // self.limits.block_size)
        if blocks > self.limits.num_kv_blocks:
            raise ValueError(f"the request may need {blocks} KV blocks ({longest} tokens), "
                             f"but the KV pool has only {self.limits.num_kv_blocks}")
