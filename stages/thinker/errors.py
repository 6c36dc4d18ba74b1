"""Errors the thinker raises to its callers (the ingress maps them to OpenAI-style responses).

Plain classes with no vLLM import, picklable with their fields (they cross Ray Serve).
"""
from __future__ import annotations


class ContextTooLongError(ValueError):
    """A prompt (context or chat history plus its visual tokens) does not fit the engine's max_model_len."""

    http_status = 400

    def __init__(self, num_tokens: int, max_model_len: int, what: str = "prompt"):
        self.num_tokens, self.max_model_len, self.what = num_tokens, max_model_len, what
        super().__init__(f"the {what} is {num_tokens} tokens long, but this deployment's thinker accepts at most "
                         f"{max_model_len} tokens (max_model_len)")

    def __reduce__(self):
        return type(self), (self.num_tokens, self.max_model_len, self.what)


class ThinkerRequestError(ValueError):
    """A request the thinker cannot serve as given (bad size, missing image, ...): a 400."""

    http_status = 400

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_request"):
        self.message, self.param, self.code = message, param, code
        super().__init__(message)

    def __reduce__(self):
        return type(self), (self.message, self.param, self.code)


class KVExportError(RuntimeError):
    """A context's KV export did not arrive (the engine failed, or the export expired before it was claimed)."""
