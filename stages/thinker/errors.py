"""Errors the thinker raises to its callers (the ingress maps them to OpenAI-style 4xx responses)."""
from __future__ import annotations


class ContextTooLongError(ValueError):
    """A prompt (context or chat history plus its visual tokens) does not fit the engine's max_model_len."""

    def __init__(self, num_tokens: int, max_model_len: int, what: str = "prompt"):
        self.num_tokens = num_tokens
        self.max_model_len = max_model_len
        super().__init__(f"the {what} is {num_tokens} tokens long, but this deployment's thinker accepts at most "
                         f"{max_model_len} tokens (max_model_len)")


class KVExportError(RuntimeError):
    """A context's KV export did not arrive (the engine failed, or the export expired before it was claimed)."""
