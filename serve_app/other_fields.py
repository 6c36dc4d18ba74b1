"""Fields that other OpenAI-compatible servers accept and Lance has no knob for, and what it does.

Lance's own knobs, and the ecosystem's names for them (`guidance_scale` -> `cfg_text_scale`, ...),
are `GenerationKnobs` (knobs.py). Every other field that a client of OpenAI's chat or images API,
vLLM's or SGLang's OpenAI server or vLLM-Omni's diffusion server may send is listed here, so that a
client's habitual fields never fail a request, and a field that asks for something Lance cannot do is
a 400 that says what to send instead. Field lists read from: the `openai` SDK 3.63's
`completion_create_params` / `image_generate_params`, vLLM 0.32's chat `protocol.py`, SGLang's
`srt/entrypoints/openai/protocol.py`, and vLLM-Omni's Lance server (`../shared/lance_spec.md` §7.3).

Each field has a JSON type, its neutral values (they ask for nothing Lance does not do already, so
they are simply accepted), and what happens to any other value: a 400 (`refuse`, the advice), or
accepted, ignored and reported in the response's `lance.ignored_params`. A text-sampling field
(`text_only`) is ignored on image output whatever its value, as every text knob is there.
The README's "Fields of other servers" table says the same in prose.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .errors import bad_request

NUMBER = (int, float)


@dataclass(frozen=True)
class OtherField:
    kind: tuple[type, ...]
    neutral: tuple = ()
    refuse: str | None = None   # None: a non-neutral value is accepted, ignored and reported
    text_only: bool = False


def _sampling(kind: tuple[type, ...], neutral: tuple, advice: str) -> OtherField:
    """A text-sampling field Lance does not implement: neutral values pass, others are a 400 on
    text output; on image output any value is ignored."""
    return OtherField(kind, (None, *neutral), advice, text_only=True)


_TOOLS = "tool calling is not supported by Lance: leave {k} out"
_CONSTRAINED = ("constrained decoding (JSON schema, regex, grammar) is not supported: leave {k} out "
                "and ask for the format in the prompt")
_LOGPROBS = "log probabilities are not returned: leave {k} out (return_token_ids gives the token ids)"
_PENALTY = "{k} is not supported: leave it out or send {n} (temperature and top_p shape sampling)"
_PROCESSORS = "custom logits processors are not supported: leave {k} out"
_LORA = "LoRA adapters are not supported: leave {k} out"
_VIDEO_SIZE = "send a video's size as size ('WIDTHxHEIGHT') or height and width: leave {k} out"
_THINK = "think mode is not supported (Lance has none): leave {k} out"
_IGNORED = None

OTHER_FIELDS: dict[str, OtherField] = {
    # OpenAI chat completions
    "frequency_penalty": _sampling(NUMBER, (0,), _PENALTY),
    "presence_penalty": _sampling(NUMBER, (0,), _PENALTY),
    "logprobs": _sampling((bool,), (False,), _LOGPROBS),
    "top_logprobs": _sampling((int,), (0,), _LOGPROBS),
    "logit_bias": OtherField((dict,), (None, {}), "logit_bias is not supported: leave it out",
                             text_only=True),
    "tools": OtherField((list,), (None, []), _TOOLS, text_only=True),
    "tool_choice": OtherField((str, dict), (None, "none", "auto"), _TOOLS, text_only=True),
    "functions": OtherField((list,), (None, []), _TOOLS, text_only=True),
    "function_call": OtherField((str, dict), (None, "none", "auto"), _TOOLS, text_only=True),
    "parallel_tool_calls": OtherField((bool,), (None, True, False)),   # without tools: nothing to do
    "audio": OtherField((dict,), (None,), "Lance answers in text or images: leave audio out"),
    "web_search_options": OtherField((dict,), (None,), "web search is not available: leave "
                                     "web_search_options out"),
    "prediction": OtherField((dict,), (None,), _IGNORED, text_only=True),   # a latency hint only
    "reasoning_effort": OtherField((str, int, float), (None, "none"), _IGNORED),   # no reasoning
    "verbosity": OtherField((str,), (None,), _IGNORED),
    "user": OtherField((str,), (None,), _IGNORED),
    "safety_identifier": OtherField((str,), (None,), _IGNORED),
    "prompt_cache_key": OtherField((str,), (None,), _IGNORED),
    "prompt_cache_retention": OtherField((str,), (None,), _IGNORED),
    "prompt_cache_options": OtherField((dict,), (None,), _IGNORED),
    "moderation": OtherField((str, dict), (None,), _IGNORED),
    "metadata": OtherField((dict,), (None, {}), _IGNORED),
    "store": OtherField((bool,), (None, False), _IGNORED),
    "service_tier": OtherField((str,), (None, "auto", "default"), _IGNORED),
    # OpenAI images API: presentation and bookkeeping (PNG, b64_json and the knobs are what Lance
    # serves; response_format and output_format are checked in request_parsing)
    "quality": OtherField((str,), (None, "auto"), _IGNORED),
    "style": OtherField((str,), (None,), _IGNORED),
    "background": OtherField((str,), (None, "auto"), _IGNORED),
    "input_fidelity": OtherField((str,), (None,), _IGNORED),
    "output_compression": OtherField((int,), (None, 100), _IGNORED),
    "partial_images": OtherField((int,), (None, 0), _IGNORED),
    "complexity": OtherField((str,), (None,), _IGNORED),
    "frame_count": OtherField((int,), (None,), _IGNORED),         # GIF output only
    "frame_duration_ms": OtherField((int,), (None,), _IGNORED),
    "svg": OtherField((dict,), (None,), _IGNORED),                 # SVG output only
    # vLLM's and SGLang's sampling extensions
    "top_k": _sampling((int,), (-1, 0), "top_k is not supported: leave it out or send -1 (use top_p)"),
    "min_p": _sampling(NUMBER, (0,), _PENALTY),
    "repetition_penalty": _sampling(NUMBER, (1,), _PENALTY),
    "length_penalty": _sampling(NUMBER, (1,), _PENALTY),
    "use_beam_search": _sampling((bool,), (False,), "beam search is not supported: leave {k} out"),
    "best_of": _sampling((int,), (1,), "best_of is not supported: leave it out or send 1"),
    "min_tokens": _sampling((int,), (0,), "min_tokens is not supported: leave it out or send 0"),
    "ignore_eos": _sampling((bool,), (False,), "ignore_eos is not supported: Lance stops at its end of turn; "
                            "max_tokens bounds the answer"),
    "stop_token_ids": _sampling((list,), ([],), "stop at strings with stop: leave {k} out"),
    "stop_regex": _sampling((str, list), (), "stop at strings with stop: leave {k} out"),
    "include_stop_str_in_output": _sampling((bool,), (False,), "include_stop_str_in_output is not supported: "
                                            "leave it out"),
    "no_stop_trim": _sampling((bool,), (False,), "no_stop_trim is not supported: leave it out"),
    "skip_special_tokens": OtherField((bool,), (None, True), _IGNORED, text_only=True),
    "spaces_between_special_tokens": OtherField((bool,), (None, True), _IGNORED, text_only=True),
    "echo": _sampling((bool,), (False,), "echo is not supported: leave it out"),
    "add_generation_prompt": _sampling((bool,), (True,), "Lance always answers as the assistant: leave {k} "
                                       "out"),
    "continue_final_message": _sampling((bool,), (False,), "the last message must be the user's: leave {k} "
                                        "out"),
    "add_special_tokens": OtherField((bool,), (None, False), _IGNORED, text_only=True),
    "chat_template": OtherField((str,), (None,), "Lance's chat template is fixed: leave "
                                "chat_template out (a system message sets the system prompt)"),
    "chat_template_kwargs": OtherField((dict,), (None, {}), _IGNORED),   # e.g. enable_thinking
    "mm_processor_kwargs": OtherField((dict,), (None, {}), _IGNORED),    # images: see resolution
    "media_io_kwargs": OtherField((dict,), (None, {}), _IGNORED),
    "documents": OtherField((list,), (None, []), "documents are not supported: put their text in a "
                            "message"),
    "structured_outputs": _sampling((dict,), (), _CONSTRAINED),
    "guided_json": _sampling((dict, str), (), _CONSTRAINED),
    "guided_regex": _sampling((str,), (), _CONSTRAINED),
    "guided_choice": _sampling((list,), (), _CONSTRAINED),
    "guided_grammar": _sampling((str,), (), _CONSTRAINED),
    "structural_tag": _sampling((str, dict), (), _CONSTRAINED),
    "regex": _sampling((str,), (), _CONSTRAINED),
    "ebnf": _sampling((str,), (), _CONSTRAINED),
    "json_schema": _sampling((str, dict), (), _CONSTRAINED),
    "logits_processors": _sampling((list,), (), _PROCESSORS),
    "custom_logit_processor": _sampling((str, list), (), _PROCESSORS),
    "return_tokens_as_token_ids": _sampling((bool,), (False,), "use return_token_ids: leave {k} out"),
    "prompt_logprobs": _sampling((int,), (), _LOGPROBS),
    "allowed_token_ids": _sampling((list,), (), "allowed_token_ids is not supported: leave it out"),
    "bad_words": _sampling((list,), ([],), "bad_words is not supported: leave it out"),
    "truncate_prompt_tokens": OtherField(NUMBER, (None,), "prompts are never truncated (a prompt "
                                         "longer than the context is a 400): leave {k} out"),
    "include_reasoning": OtherField((bool,), (None, True, False)),   # Lance has no reasoning to split
    "separate_reasoning": OtherField((bool,), (None, True, False)),
    "stream_reasoning": OtherField((bool,), (None, True, False)),
    "thinking_token_budget": OtherField((int,), (None,), _THINK),
    "return_hidden_states": OtherField((bool, str), (None, False), "hidden states are not returned: "
                                       "leave {k} out"),
    "lora_path": OtherField((str, list), (None,), _LORA),
    "priority": OtherField((int,), (None, 0), _IGNORED),   # Serve queues in arrival order
    "request_id": OtherField((str,), (None,), _IGNORED),   # the server names requests
    "rid": OtherField((str, list), (None,), _IGNORED),
    "cache_salt": OtherField((str, list), (None,), _IGNORED),
    "session_id": OtherField((str,), (None,), _IGNORED),
    "vllm_xargs": OtherField((dict,), (None, {}), _IGNORED),
    "custom_params": OtherField((dict,), (None, {}), _IGNORED),
    "stream_interval": OtherField((int,), (None, 1), _IGNORED),
    "kv_transfer_params": OtherField((dict,), (None,), "kv_transfer_params is internal to vLLM's "
                                     "disaggregated serving: leave it out"),
    # vLLM-Omni's diffusion and Lance fields without a Lance knob
    "guidance_scale_2": OtherField(NUMBER, (None,), _IGNORED),   # Wan2.2's second expert: Lance has one
    "lora": OtherField((dict, str), (None,), _LORA),
    "layers": OtherField((int,), (None,), "layers (layered image output) is not supported by Lance: "
                         "leave it out"),
    "video_height": OtherField((int,), (None,), _VIDEO_SIZE),
    "video_width": OtherField((int,), (None,), _VIDEO_SIZE),
    # the input video's rate: Lance reads it from the file (the sampler resamples to 12 fps)
    "origin_fps": OtherField(NUMBER, (None,), _IGNORED),
    "think": OtherField((bool,), (None, False), _THINK),
    "max_think_tokens": OtherField((int,), (None,), _THINK),
    "user_text": OtherField((str,), (None,), "send the user's text as the message content: leave "
                            "user_text out"),
}


def _is_neutral(value: Any, neutral: tuple) -> bool:
    # False == 0 in Python: a bool is neutral only where a bool is listed, and a number only where
    # a number is
    return any(value is n if n is None else
               (value == n and isinstance(value, bool) == isinstance(n, bool))
               for n in neutral)


def _has_kind(value: Any, kind: tuple[type, ...]) -> bool:
    if value is None:
        return True
    if isinstance(value, bool):
        return bool in kind
    return isinstance(value, kind)


_KIND_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
               dict: "an object", list: "an array"}


def split_other_fields(values: dict) -> tuple[dict, dict]:
    """(Lance's knobs, the other servers' fields) of a merged knob dict."""
    lance = {k: v for k, v in values.items() if k not in OTHER_FIELDS}
    other = {k: v for k, v in values.items() if k in OTHER_FIELDS}
    return lance, other


# What a form's boolean field may say (the spellings of pydantic's lax bool, in the usual cases; the
# form schema in /openapi.json lists exactly these)
FORM_BOOLEANS = {v: list(dict.fromkeys(c for w in words for c in (w, w.capitalize(), w.upper())))
                 for v, words in ((True, ("true", "1", "yes", "on", "t", "y")),
                                  (False, ("false", "0", "no", "off", "f", "n")))}


def _reject_constant(name: str):
    raise ValueError(name)   # NaN / Infinity: not JSON numbers


def _form_value(value: Any, kind: tuple[type, ...]) -> Any:
    """A multipart form value (text; a list from `name[]`, a dict from `name[key]`) read as the JSON
    type the field has, as a form spells it; None where it is not one."""
    if not isinstance(value, str):
        return value if _has_kind(value, kind) else None
    if str in kind:
        return value
    if bool in kind:
        for truth, spellings in FORM_BOOLEANS.items():
            if value in spellings:
                return truth
    if int in kind or float in kind:
        try:
            number = json.loads(value, parse_constant=_reject_constant)
        except ValueError:
            return None
        if not isinstance(number, bool) and _has_kind(number, kind):
            return number
    return None


def screen_other_fields(values: dict, image_output: bool, *, typed: bool = True) -> list[str]:
    """The names of the fields in `values` that are ignored; a 400 for one that Lance refuses.

    `typed=False` for multipart form values: each must read as its field's type the way a form spells
    it ('true', '30', repeated `name[]` for an array), like a JSON body's value; no form value is
    neutral (a form cannot say null, false-as-absent or []), so a field is then refused or ignored by
    name."""
    ignored = []
    for name, value in values.items():
        field = OTHER_FIELDS[name]
        checked = value if typed else _form_value(value, field.kind)
        if not _has_kind(checked, field.kind) or (not typed and checked is None):
            kinds = " or ".join(_KIND_NAMES.get(k, k.__name__) for k in field.kind)
            raise bad_request(f"{name} must be {kinds}" + ("" if typed else " (as a form spells it: "
                              "'true', '30', repeated name[] fields for an array)"), param=name,
                              code="invalid_type")
        if typed and _is_neutral(value, field.neutral):
            continue
        if field.refuse is not None and not (field.text_only and image_output):
            raise bad_request(field.refuse.format(k=name, n=_neutral_example(field)), param=name,
                              code="unsupported_parameter")
        ignored.append(name)
    return ignored


def _neutral_example(field: OtherField) -> str:
    shown = [n for n in field.neutral if n is not None]
    return repr(shown[0]) if shown else "nothing"
