"""What /openapi.json says about every route: its request and response bodies, its query and path
parameters and its error answers, so that a client generator, `/docs` and a fuzzer can use it.

The handlers read raw requests (knobs may sit at the top level, in `extra_body` or in `extra_args`; a
valid knob that does not apply to the routed task is accepted and reported; every error is a 4xx
that names the field), so FastAPI cannot infer the bodies. They are built here, once per app, from
the parser's own definitions rather than from a second field list:

  top-level fields    the parser's request models (openai_protocol.ChatCompletionRequest,
                      ImageGenerationRequest, videos_api.VideoCreateRequest)
  Lance's knobs       knobs.GenerationKnobs (its types and bounds)
  other servers'      other_fields.OTHER_FIELDS (their JSON types; what a non-neutral value does
  fields              is in each one's description)
  limits              the app's RequestLimits, through the rules of `limit_constraints` below: the
                      checks the parser does in code (sizes, steps, frame counts, n, max_tokens...)

Every body object has `additionalProperties: false` where the parser refuses unknown keys (the
request bodies and the knob containers), and is open where the parser ignores unknown keys (the parts
of a message, as OpenAI objects gain fields over time). What a schema cannot say (two names of one
knob with different values, an image that does not decode, a knob that another field makes
meaningless) is a 400 naming the field, documented as such. Errors are OpenAI error bodies
(errors.ErrorResponse). The response models live beside the code that builds the responses
(openai_protocol.py, video_jobs.py, errors.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, create_model
from pydantic.fields import FieldInfo
from pydantic.json_schema import models_json_schema

from stages.lance.requests import IMAGE_FORMATS

from . import openai_protocol as oai
from .errors import ErrorResponse
from .knobs import GenerationKnobs, RequestLimits
from .other_fields import FORM_BOOLEANS, OTHER_FIELDS, _neutral_example
from .video_jobs import Video, VideoDeleted, VideoList
from .videos_api import FRAMES_PER_SECOND, VideoCreateRequest

REF = "#/components/schemas/{model}"

# -- the limits the parser checks in code, as JSON-schema constraints -------------------------------


def _sides(limits: RequestLimits) -> list[int]:
    return list(range(limits.min_image_side, limits.max_image_side + 1, limits.size_multiple))


def size_pattern(limits: RequestLimits) -> str:
    """knobs.target_size: 'WIDTHxHEIGHT' with both sides multiples of size_multiple in
    [min_image_side, max_image_side], or 'auto'."""
    sides = "0*(?:" + "|".join(str(s) for s in reversed(_sides(limits))) + ")"
    return rf"^(?:\s*{sides}\s*[xX]\s*{sides}\s*|auto)$"


def frame_counts(limits: RequestLimits) -> list[int]:
    """knobs.check_num_frames: stride*k + 1 frames, at most max_num_frames."""
    return list(range(1, limits.max_num_frames + 1, limits.frame_stride))


def seconds_pattern(limits: RequestLimits) -> str:
    """videos_api.frames_of_seconds as text: whole seconds, or thirds ('4/3'), that make 4k+1
    frames at 12 frames a second, at most max_num_frames."""
    top = (limits.max_num_frames - 1) // FRAMES_PER_SECOND
    whole = "|".join(str(s) for s in range(top, -1, -1))
    thirds = "|".join(str(k) for k in range(top * 3, -1, -1))
    return rf"^\s*(?:(?:{whole})(?:\.0*)?|(?:{thirds})/3)\s*$"


def limit_constraints(limits: RequestLimits) -> dict[str, dict]:
    """Field constraints of the checks the parser does in code (knobs.py, request_parsing.py,
    videos_api.py) with this app's limits. Keys are knob or field names; values are pydantic
    Field arguments. Cross-field rules (size vs height/width, two names of one knob, n > 1 with
    text output) are not expressible here: they stay 400s that name the field."""
    side = dict(ge=limits.min_image_side, le=limits.max_image_side, multiple_of=limits.size_multiple)
    n = dict(ge=1, le=limits.max_n)
    return {
        "height": side, "width": side,
        "size": dict(pattern=size_pattern(limits)),
        "num_inference_steps": dict(le=limits.max_inference_steps),
        "n": n, "num_outputs_per_prompt": n,
        "num_frames": dict(json_schema_extra={"enum": [None, *frame_counts(limits)]}),
        "fps": dict(le=limits.max_fps),
        "cfg_interval": dict(json_schema_extra={"items": {"type": "number", "minimum": 0,
                                                          "maximum": 1}}),
        "cfg_img_scale": dict(json_schema_extra={"enum": [None, 1.0]}),
        "modalities": dict(json_schema_extra={"enum": [None, ["image"], ["video"], ["text"]]}),
        # request_parsing._image_request / video_request: "the prompt is empty"
        "prompt": dict(pattern=r"\S"),
        # request_parsing._sampling
        "max_tokens": dict(ge=1, le=limits.max_new_tokens),
        "max_completion_tokens": dict(ge=1, le=limits.max_new_tokens),
        "temperature": dict(ge=0, le=2),
        "top_p": dict(gt=0, le=1),
        "stop": dict(json_schema_extra={"minLength": 1, "maxItems": 4,
                                        "items": {"type": "string", "minLength": 1}}),
        # request_parsing._check_images_fields
        "output_format": dict(json_schema_extra={"enum": [None, *IMAGE_FORMATS]}),
        "output_compression": dict(ge=0, le=100),
        # videos_api.frames_of_seconds
        "seconds": dict(json_schema_extra={
            "anyOf": [{"type": "integer", "minimum": 0,
                       "maximum": (limits.max_num_frames - 1) // FRAMES_PER_SECOND},
                      {"type": "string", "pattern": seconds_pattern(limits)}, {"type": "null"}]}),
    }


# Per route: what the route itself allows of a knob that every route reads
ROUTE_OVERRIDES = {
    "images": {"modalities": dict(json_schema_extra={"enum": [None, ["image"]]}),
               "stream": dict(json_schema_extra={"enum": [False]}),
               "response_format": dict(json_schema_extra={"enum": [None, "b64_json"]})},
    "videos": {"modalities": dict(json_schema_extra={"enum": [None, ["video"]]}),
               "n": dict(json_schema_extra={"enum": [None, 1]}),
               "num_outputs_per_prompt": dict(json_schema_extra={"enum": [None, 1]})},
}

# -- building the body models ----------------------------------------------------------------------

_JSON_TYPES = {bool: bool, int: int, float: float, str: str, dict: dict[str, Any], list: list[Any]}
_KNOB_DOC = ("A Lance generation knob (knobs.py); it may also be sent in extra_body or extra_args. "
             "Valid for every task; a knob the routed task does not read is accepted and reported "
             "in lance.ignored_params.")


def _merged(info: FieldInfo, extra: dict | None, description: str | None = None) -> FieldInfo:
    parts = [info]
    if extra:
        extra = dict(extra)
        schema_extra = extra.pop("json_schema_extra", None)
        if schema_extra and isinstance(info.json_schema_extra, dict):
            schema_extra = {**info.json_schema_extra, **schema_extra}
        parts.append(Field(json_schema_extra=schema_extra, **extra) if schema_extra
                     else Field(**extra))
    if description and not info.description:
        parts.append(Field(description=description))
    return FieldInfo.merge_field_infos(*parts) if len(parts) > 1 else info


def _other_field(name: str) -> tuple[Any, FieldInfo]:
    """other_fields.screen_other_fields as a schema: the field's JSON types; a field that is
    refused whatever the output takes only its neutral values."""
    spec = OTHER_FIELDS[name]
    kinds = tuple(_JSON_TYPES[k] for k in spec.kind)
    annotation = Optional[Union[kinds]] if len(kinds) > 1 else Optional[kinds[0]]
    if spec.refuse is None:
        return annotation, Field(None, description=(
            "Another OpenAI server's field: accepted; a value that asks for something is ignored "
            "and reported in lance.ignored_params"))
    advice = spec.refuse.format(k=name, n=_neutral_example(spec))
    if spec.text_only:
        return annotation, Field(None, description=(
            f"Not implemented for text output: only its neutral value is accepted there, any other "
            f"is a 400 ({advice}); on image or video output any value is ignored and reported"))
    return annotation, Field(None, description=f"Not supported: only its neutral value is accepted "
                             f"({advice})", json_schema_extra={"enum": list(spec.neutral)})


@dataclass(frozen=True)
class _Fields:
    """Field definitions (name -> (annotation, FieldInfo)) for create_model."""
    items: dict

    @classmethod
    def of_model(cls, model: type[BaseModel], constraints: dict,
                 skip: tuple[str, ...] = ()) -> "_Fields":
        return cls({name: (info.annotation, _merged(info, constraints.get(name)))
                    for name, info in model.model_fields.items() if name not in skip})

    def __or__(self, other: "_Fields") -> "_Fields":
        return _Fields({**other.items, **self.items})   # the left side's definition wins


def knob_fields(constraints: dict) -> _Fields:
    return _Fields({name: (info.annotation, _merged(info, constraints.get(name), _KNOB_DOC))
                    for name, info in GenerationKnobs.model_fields.items()})


def other_fields() -> _Fields:
    return _Fields({name: _other_field(name) for name in OTHER_FIELDS})


def _model(name: str, fields: _Fields, doc: str, **extra_config) -> type[BaseModel]:
    config = ConfigDict(extra="forbid", title=name, json_schema_extra=extra_config or None)
    model = create_model(name, __config__=config, __doc__=doc, **fields.items)
    return model


_FORM_STRING = ("Form fields are text: numbers and booleans are their JSON spelling ('30', '0.5', "
                "'true'); an array is sent as repeated `name[]` fields, or as one field holding a "
                "JSON array")
_FORM_NESTED = {r"^extra_(?:body|args)\[[^\[\]]+\]$": {
    "type": "string", "description": "a knob nested the way the OpenAI SDK sends extra_body in a "
                                     "form: extra_body[seed]=7"}}


def _form_fields(fields: _Fields) -> _Fields:
    """A JSON body's fields as multipart text fields: a field is absent or has a value (no null),
    arrays are repeated `name[]` fields, objects travel only as `extra_body[key]` parts
    (_FORM_NESTED)."""
    out = {}
    for name, (annotation, info) in fields.items.items():
        schema = _field_schema(annotation, info)
        doc = {"description": info.description} if info.description else {}
        branches = [b for b in schema.get("anyOf", [schema]) if b.get("type") != "null"]
        enum = [v for v in schema.get("enum", []) if v is not None]
        spec = OTHER_FIELDS.get(name)
        if spec is not None and spec.refuse is not None and not spec.text_only:
            continue   # no form value is neutral (form text is never null, false or []): a 400
        arrays = [b for b in branches if b.get("type") == "array"]
        scalars = [b for b in branches if b.get("type") not in ("array", "object")
                   and "$ref" not in b]
        if arrays:
            array = {**arrays[0], **({"items": schema["items"]} if "items" in schema else {})}
            if enum and all(isinstance(v, list) and len(v) == 1 for v in enum):
                array.update(maxItems=1, items={"enum": [v[0] for v in enum]})
            if array.get("minItems"):   # no field at all is how a form sends an empty array:
                fields_ = {k: array.pop(k) for k in ("minItems", "maxItems") if k in array}
                array["anyOf"] = [{"maxItems": 0}, fields_]   # the same as leaving it out
            array.pop("minItems", None)
            out[f"{name}[]"] = (Any, Field(None, json_schema_extra=_clean({**array, **doc})))
        if scalars:
            scalar = scalars[0] if len(scalars) == 1 else {"anyOf": scalars}
            if enum and not arrays:
                scalar = {**scalar, "enum": enum}
            if scalar.get("type") == "boolean":   # form text: the spellings pydantic reads
                scalar = {"type": "string", "enum": [
                    t for v in (scalar.get("enum") or [True, False]) for t in FORM_BOOLEANS[v]]}
            if "minLength" in schema and not arrays:
                scalar = {**scalar, "minLength": schema["minLength"]}
            out[name] = (Any, _form_field(info, {**scalar, **doc}))
        if not schema.get("anyOf") and not schema.get("type") and "$ref" not in schema:   # Any
            out[name] = (Any, _form_field(info, {"type": "string", **doc}))
    return _Fields(out)


def _clean(schema: dict) -> dict:
    return {k: v for k, v in schema.items() if k not in ("title", "default")}


def _form_field(info: FieldInfo, schema: dict) -> FieldInfo:
    schema = _clean(schema)
    return Field(json_schema_extra=schema) if info.is_required() \
        else Field(None, json_schema_extra=schema)


def _field_schema(annotation, info: FieldInfo) -> dict:
    probe = create_model("Probe", f=(annotation, info))
    return probe.model_json_schema()["properties"]["f"]


@dataclass(frozen=True)
class RequestBodies:
    """The request body models of one app (its limits), by what they describe."""

    chat: type[BaseModel]
    images: type[BaseModel]
    images_form: type[BaseModel]
    video: type[BaseModel]
    video_form: type[BaseModel]
    remix: type[BaseModel]

    def models(self) -> list[type[BaseModel]]:
        return [self.chat, self.images, self.images_form, self.video, self.video_form, self.remix]


def request_bodies(limits: RequestLimits) -> RequestBodies:
    limit = limit_constraints(limits)
    others = other_fields()

    def container(name: str, route: str, nested: type[BaseModel] | None) -> type[BaseModel]:
        fields = knob_fields({**limit, **ROUTE_OVERRIDES.get(route, {})}) | others
        if nested is not None:
            fields = _Fields({**fields.items, "extra_args": (Optional[nested], Field(
                None, description="more knobs (vLLM-Omni's extra_args), merged with the others"))})
        return _model(name, fields, "Lance's knobs and other servers' fields, as at the top level; "
                      "a key given in two places with different values is a 400")

    def with_containers(route: str, prefix: str) -> _Fields:
        args = container(f"{prefix}ExtraArgs", route, None)
        body = container(f"{prefix}ExtraBody", route, args)
        return _Fields({
            "extra_body": (Optional[body], Field(None, description="knobs nested the way raw-JSON "
                                                  "clients send the OpenAI SDK's extra_body")),
            "extra_args": (Optional[args], Field(None, description="vLLM-Omni's knob container"))})

    chat_fields = (_Fields.of_model(oai.ChatCompletionRequest, limit, skip=("extra_body", "extra_args"))
                   | with_containers("chat", "Chat") | knob_fields(limit) | others)
    chat = _model("ChatCompletionBody", chat_fields,
                  "POST /v1/chat/completions. `modalities` routes the request: [\"image\"] makes "
                  "or edits an image (one image_url part: an edit), [\"video\"] makes or edits a "
                  "video (Lance_3B_Video), [\"text\"] (the default) answers in text.")

    images_limit = {**limit, **ROUTE_OVERRIDES["images"]}
    images_fields = (_Fields.of_model(oai.ImageGenerationRequest, images_limit,
                                      skip=("extra_body", "extra_args"))
                     | with_containers("images", "Images")
                     | knob_fields(images_limit) | others)
    images = _model("ImageGenerationBody", images_fields, "POST /v1/images/generations")
    edit_fields = _Fields({"image": (bytes, Field(description="the image to edit (PNG, JPEG, "
                                                  "WebP, ...)", json_schema_extra={
                                                      "format": "binary", "type": "string"}))}) \
        | _form_fields(images_fields)
    images_form = _model("ImageEditForm", edit_fields,
                         "POST /v1/images/edits (multipart/form-data). " + _FORM_STRING,
                         patternProperties=_FORM_NESTED)

    video_limit = {**limit, **ROUTE_OVERRIDES["videos"]}
    ref_doc = ("the clip's first frame (i2v) as {\"image_url\": \"data:image/...;base64,...\"}; "
               "file ids are not served (a 400)")
    video_common = (_Fields.of_model(VideoCreateRequest, video_limit,
                                     skip=("extra_body", "extra_args", "input_reference"))
                    | with_containers("videos", "Video") | knob_fields(video_limit) | others)
    video = _model("VideoCreateBody", _Fields({"input_reference": (
        Optional[InputReference], Field(None, description=ref_doc))}) | video_common,
        "POST /v1/videos (JSON): text to video, or image to video with input_reference")
    video_form = _model("VideoCreateForm", _Fields({"input_reference": (Optional[bytes], Field(
        None, description="an image (i2v: the first frame) or a video file (video_edit; sent with "
                          "a video/* content type)",
        json_schema_extra={"format": "binary", "type": "string"}))}) | _form_fields(video_common),
        "POST /v1/videos (multipart/form-data). " + _FORM_STRING, patternProperties=_FORM_NESTED)
    remix = _model("VideoRemixBody", video_common,
                   "POST /v1/videos/{video_id}/remix: a video_edit of the finished video with a new "
                   "prompt; the output keeps the source's frame count and bucketed size")
    return RequestBodies(chat, images, images_form, video, video_form, remix)


class InputReference(BaseModel):
    """/v1/videos JSON input_reference (videos_api / ingress._reference_json)."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"not": {"required": ["file_id"]}})

    image_url: str = Field(description="data:image/...;base64,... (or http(s) where the operator "
                                       "enabled remote media)")


# -- responses ------------------------------------------------------------------------------------

ERROR_DESCRIPTIONS = {
    400: "invalid request: an OpenAI error body whose `param` names the field and whose message "
         "says what to send instead",
    401: "missing or wrong API key (`code: invalid_api_key`, `WWW-Authenticate: Bearer`)",
    404: "the model (`code: model_not_found`) or the video is not served here",
    409: "the video is not completed yet",
    413: "the request body is larger than the server's cap",
    429: "too many stored video jobs (`Retry-After`)",
    431: "too many or too large request headers",
    503: "a stage is unavailable or overloaded (`Retry-After`)",
    504: "the request did not finish within the server's request timeout",
}
COMMON_ERRORS = (400, 401, 413, 431)


def error_responses(*statuses: int, api_keys: bool = True) -> dict:
    codes = [s for s in (*COMMON_ERRORS, *statuses) if api_keys or s != 401]
    return {s: {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[s]}
            for s in sorted(set(codes))}


def request_body(content: dict[str, type[BaseModel]], examples: dict | None = None) -> dict:
    """openapi_extra of a route whose handler reads the raw request; `examples` (name -> JSON
    body) for its JSON body."""
    body = {media: {"schema": {"$ref": REF.format(model=model.__name__)}}
            for media, model in content.items()}
    if examples:
        body["application/json"]["examples"] = {name: {"value": value}
                                                for name, value in examples.items()}
    return {"requestBody": {"required": True, "content": body}}


_PROMPT = "A red cube on a blue table"
EXAMPLES = {
    "chat": {
        "text": {"messages": [{"role": "user", "content": "What is a cube?"}], "max_tokens": 32},
        "image": {"messages": [{"role": "user", "content": _PROMPT}], "modalities": ["image"],
                  "size": "256x256", "num_inference_steps": 8, "seed": 42},
        "image_stream": {"messages": [{"role": "user", "content": _PROMPT}],
                         "modalities": ["image"], "stream": True, "size": "256x256",
                         "num_inference_steps": 8},
        "video": {"messages": [{"role": "user", "content": "A red cube turning"}],
                  "modalities": ["video"], "size": "256x256", "num_frames": 9,
                  "num_inference_steps": 8},
    },
    "images": {"t2i": {"prompt": _PROMPT, "size": "256x256", "n": 1, "seed": 7,
                       "extra_body": {"num_inference_steps": 8}},
               "webp": {"prompt": _PROMPT, "size": "256x256", "output_format": "webp",
                        "output_compression": 80}},
    "video": {"t2v": {"prompt": "A red cube turning", "seconds": "4", "size": "256x256",
                      "num_inference_steps": 8}},
    "remix": {"remix": {"prompt": "The cube turns blue", "num_inference_steps": 8}},
}


SSE_DOC = ("with stream: true, server-sent events: `data: <ChatCompletionChunk JSON>` lines, "
           "ending with `data: [DONE]`; an error after the stream started is a "
           "`data: {\"error\": ...}` event")
# One event of the stream (what an SSE parser yields): its data is a chunk, an error body, or [DONE]
SSE_EVENT = {"type": "object", "description": SSE_DOC, "required": ["data"], "properties": {
    "event": {"type": "string"}, "id": {"type": "string"}, "retry": {"type": "integer"},
    "data": {"anyOf": [{"const": "[DONE]"}, {
        "type": "string", "contentMediaType": "application/json", "contentSchema": {
            "anyOf": [{"$ref": REF.format(model="ChatCompletionChunk")},
                      {"$ref": REF.format(model="ErrorResponse")}]}}]}}}
BINARY = {"schema": {"type": "string", "format": "binary"}}


def route_docs(bodies: RequestBodies, api_keys: bool) -> dict[tuple[str, str], dict]:
    """Keyword arguments of app.get/post/delete per (method, path): summary, request body,
    response model and error answers."""
    def err(*statuses):
        return error_responses(*statuses, api_keys=api_keys)

    return {
        ("POST", "/v1/chat/completions"): dict(
            summary="Chat completion: text, image or video output, routed by modalities and inputs",
            openapi_extra=request_body({"application/json": bodies.chat}, EXAMPLES["chat"]),
            response_model=oai.ChatCompletion,
            responses={200: {"description": "the completion (JSON), or an SSE stream",
                             "content": {"text/event-stream": {"schema": SSE_EVENT}}},
                       **err(404, 503, 504)}),
        ("POST", "/v1/images/generations"): dict(
            summary="Text to image (OpenAI images API)",
            openapi_extra=request_body({"application/json": bodies.images}, EXAMPLES["images"]),
            response_model=oai.ImagesResponse, responses=err(404, 503, 504)),
        ("POST", "/v1/images/edits"): dict(
            summary="Image edit (OpenAI images API, multipart: image + prompt)",
            openapi_extra=request_body({"multipart/form-data": bodies.images_form}),
            response_model=oai.ImagesResponse, responses=err(404, 503, 504)),
        ("POST", "/v1/videos"): dict(
            summary="Create a video job (OpenAI Videos API; JSON or multipart)",
            openapi_extra=request_body({"application/json": bodies.video,
                                        "multipart/form-data": bodies.video_form},
                                       EXAMPLES["video"]),
            response_model=Video, responses=err(404, 429, 503)),
        ("GET", "/v1/videos"): dict(summary="List video jobs", response_model=VideoList,
                                    responses=err(503)),
        ("GET", "/v1/videos/{video_id}"): dict(summary="A video job", response_model=Video,
                                               responses=err(404, 503)),
        ("GET", "/v1/videos/{video_id}/content"): dict(
            summary="The finished video (MP4) or its first frame (variant=thumbnail, WebP)",
            responses={200: {"description": "the media file",
                             "content": {"video/mp4": BINARY, "image/webp": BINARY}},
                       **err(404, 409, 503)}),
        ("DELETE", "/v1/videos/{video_id}"): dict(
            summary="Delete a video job (a running one is cancelled in both stages)",
            response_model=VideoDeleted, responses=err(404, 503)),
        ("POST", "/v1/videos/{video_id}/remix"): dict(
            summary="Remix a finished video with a new prompt (video_edit)",
            openapi_extra=request_body({"application/json": bodies.remix}, EXAMPLES["remix"]),
            response_model=Video, responses=err(404, 429, 503)),
        ("GET", "/v1/models"): dict(summary="The served model, its tasks, limits and defaults",
                                    response_model=oai.ModelList, responses=err()),
        ("GET", "/health"): dict(
            summary="200 when every stage answers its health check",
            response_model=oai.HealthResponse,
            responses={503: {"model": oai.HealthError,
                             "description": "a stage is down: which one, in `stages`"},
                       **error_responses(api_keys=False)}),
    }


def install_openapi(app, bodies: RequestBodies, api_keys: bool) -> None:
    """Make app.openapi() include the request body models, drop FastAPI's 422 answers (this
    server answers a validation problem with a 400 OpenAI error) and, with API keys, declare the
    bearer scheme on every protected route."""
    from fastapi.openapi.utils import get_openapi

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes,
                             description=app.description)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        _, defs = models_json_schema([(m, "validation") for m in bodies.models()],
                                     ref_template=REF)
        components.update(_shared_properties(defs.get("$defs", {})))
        _, chunk = models_json_schema([(oai.ChatCompletionChunk, "serialization")],
                                      ref_template=REF)   # the stream's events (SSE_EVENT)
        for name, definition in chunk.get("$defs", {}).items():
            components.setdefault(name, definition)
        for path, item in schema.get("paths", {}).items():
            for method, op in item.items():
                op.get("responses", {}).pop("422", None)
                if api_keys and path != "/health":
                    op["security"] = [{"bearer": []}]
        for route in app.routes:   # a media route (video content) answers no JSON
            documented = getattr(route, "responses", {}).get(200, {}).get("content", {})
            if getattr(route, "response_model", True) is None and documented \
                    and "application/json" not in documented:
                for method in route.methods:
                    schema["paths"][route.path][method.lower()]["responses"]["200"][
                        "content"].pop("application/json", None)
        for unused in ("HTTPValidationError", "ValidationError"):
            components.pop(unused, None)
        if api_keys:
            schema["components"]["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer"}}
        app.openapi_schema = schema
        return schema

    app.openapi = openapi


def _shared_properties(defs: dict, min_chars: int = 120) -> dict:
    """The request models' definitions with every property schema that several of them repeat
    (each knob and other server's field is in every body and knob container) moved to one
    component `Field_<name>` and referenced: /openapi.json is a fifth of the size."""
    import json

    def key(prop: dict) -> str:
        return json.dumps(prop, sort_keys=True)

    uses: dict[str, int] = {}
    for model in defs.values():
        for prop in model.get("properties", {}).values():
            uses[key(prop)] = uses.get(key(prop), 0) + 1
    shared: dict[str, str] = {}      # property JSON -> component name
    out = dict(defs)
    for model_name, model in defs.items():
        props = dict(model.get("properties", {}))
        for name, prop in props.items():
            k = key(prop)
            if uses[k] < 2 or len(k) < min_chars:
                continue
            if k not in shared:
                base = "Field_" + name.replace("[]", "_array")
                component, i = base, 2
                while component in out:
                    component, i = f"{base}_{i}", i + 1
                shared[k] = component
                out[component] = prop
            props[name] = {"$ref": REF.format(model=shared[k])}
        if props:
            out[model_name] = {**model, "properties": props}
    return out
