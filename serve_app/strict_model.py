"""A pydantic base that refuses unknown keys and suggests the key that was probably meant.

Ray accepts `num_gpu:` silently and the OpenAI SDK sends any `extra_body` key we never read; both
turn a typo into a setting that quietly does nothing. Here a typo is an error that names the fix.
"""
from __future__ import annotations

import difflib

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from pydantic_core import PydanticCustomError


def suggest(key: str, valid) -> str:
    """' (did you mean 'x'?)' for the closest valid key, or the list of valid keys."""
    valid = sorted(valid)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if close:
        return f" (did you mean '{close[0]}'?)"
    return f" (valid keys: {', '.join(valid)})"


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_keys(cls, data):
        if isinstance(data, dict):
            for key in data:
                if key not in cls.model_fields:
                    raise PydanticCustomError(
                        "unknown_key", "unknown key '{key}'{hint}",
                        {"key": str(key), "hint": suggest(str(key), cls.model_fields)})
        return data


def error_lines(exc: ValidationError) -> list[tuple[str, str]]:
    """(dotted key path, message) per problem; an unknown key's path ends with the key itself."""
    out = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        if err["type"] == "unknown_key":
            loc.append(err["ctx"]["key"])
        msg = err["msg"].removeprefix("Value error, ")
        out.append((".".join(loc) or "<top level>", msg))
    return out
