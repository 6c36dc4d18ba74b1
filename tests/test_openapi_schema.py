"""/openapi.json tells the truth (issue 13, item 8): every route has its request and response bodies,
they come from the parser's own definitions, and for each limit the parser checks in code the schema
accepts exactly what the real app accepts.

The app is the real FastAPI app without stages (a request that passes parsing reaches the stage call
and gets a 503 here); the fuzz of a real server is benchmarks/fuzz_openapi.py and
tests/test_openapi_fuzz.py.
"""
from __future__ import annotations

import json

import jsonschema
import pytest
from fastapi.testclient import TestClient

from serve_app import openai_protocol as oai
from serve_app.errors import ErrorResponse, OpenAIError
from serve_app.ingress import IngressSettings, LanceService, build_fastapi_app
from serve_app.knobs import GenerationKnobs
from serve_app.other_fields import OTHER_FIELDS
from serve_app.video_jobs import Video, VideoDeleted, VideoList, _Job
from stages.lance.requests import VideoRequest

VARIANTS = ("Lance_3B", "Lance_3B_Video")
SETTINGS = IngressSettings(served_model_name="lance-test", model_path="/models/lance",
                           variants=VARIANTS)


@pytest.fixture(scope="module")
def client() -> TestClient:
    return TestClient(build_fastapi_app(LanceService(SETTINGS)), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def spec(client) -> dict:
    r = client.get("/openapi.json")
    assert r.status_code == 200
    return r.json()


def _resolve(spec: dict, node: dict) -> dict:
    while "$ref" in node:
        node = spec["components"]["schemas"][node["$ref"].rsplit("/", 1)[1]]
    return node


def _validator(spec: dict, component: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator({"$ref": f"#/components/schemas/{component}",
                                            "components": spec["components"]})


def test_every_route_has_request_and_response_bodies(client, spec):
    routes = {(m.upper(), p) for p, item in spec["paths"].items() for m in item}
    app_routes = {(m, r.path) for r in client.app.routes if getattr(r, "include_in_schema", False)
                  for m in r.methods}
    assert routes == app_routes and len(routes) == 11
    for path, item in spec["paths"].items():
        for method, op in item.items():
            where = f"{method.upper()} {path}"
            ok = op["responses"]["200"]["content"]
            assert ok and all("schema" in c for c in ok.values()), where
            if path != "/v1/videos/{video_id}/content":
                assert "$ref" in ok["application/json"]["schema"], where
            assert "422" not in op["responses"], where       # validation problems are 400s
            bad = op["responses"]["400"]["content"]["application/json"]["schema"]
            assert bad["$ref"].endswith("/ErrorResponse"), where
            if method == "post":
                body = op["requestBody"]["content"]
                assert op["requestBody"]["required"] and body, where
                for media, content in body.items():
                    schema = _resolve(spec, content["schema"])
                    assert schema["properties"] and schema["additionalProperties"] is False, where
    videos = spec["paths"]["/v1/videos"]["post"]["requestBody"]["content"]
    assert set(videos) == {"application/json", "multipart/form-data"}
    content = spec["paths"]["/v1/videos/{video_id}/content"]["get"]["responses"]["200"]["content"]
    assert set(content) == {"video/mp4", "image/webp"}
    stream = spec["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert set(stream) == {"application/json", "text/event-stream"}
    params = {p["name"]: p for p in spec["paths"]["/v1/videos"]["get"]["parameters"]}
    assert params["limit"]["schema"]["maximum"] == 100 and \
        params["order"]["schema"]["enum"] == ["asc", "desc"]


def test_bodies_come_from_the_parser_definitions(spec):
    chat = _resolve(spec, {"$ref": "#/components/schemas/ChatCompletionBody"})["properties"]
    assert set(GenerationKnobs.model_fields) <= set(chat)
    assert set(OTHER_FIELDS) <= set(chat)
    assert set(oai.ChatCompletionRequest.model_fields) <= set(chat)
    images = _resolve(spec, {"$ref": "#/components/schemas/ImageGenerationBody"})["properties"]
    assert set(oai.ImageGenerationRequest.model_fields) <= set(images)
    form = _resolve(spec, {"$ref": "#/components/schemas/ImageEditForm"})
    assert form["properties"]["image"]["format"] == "binary" and "image" in form["required"]
    assert "cfg_interval[]" in form["properties"] and "extra_body" not in form["properties"]
    # a field that is refused whatever the output takes only its neutral value; in a form it is
    # absent (form text is never null / false / [])
    audio = _resolve(spec, chat["audio"])
    assert audio["enum"] == [None] and "audio" not in form["properties"]


def _status(client, path: str, body: dict) -> int:
    r = client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code in (400, 503), r.text    # 503: it passed parsing (no stages here)
    if r.status_code == 503:
        assert r.json()["error"]["code"] in ("stage_unavailable", "video_store_unavailable")
    return r.status_code


CHAT_TEXT = {"messages": [{"role": "user", "content": "what is a red cube?"}]}
CHAT_IMAGE = dict(CHAT_TEXT, modalities=["image"])
# (route, base body, component, field, values): the values straddle each limit the parser checks
AGREEMENT = [
    ("/v1/chat/completions", dict(CHAT_IMAGE, width=64), "ChatCompletionBody", "height",
     [48, 64, 72, 80, 1024, 1040, -16, 0]),
    ("/v1/chat/completions", CHAT_IMAGE, "ChatCompletionBody", "size",
     ["64x64", "1024X1024", " 80 x 96 ", "0064x64", "1040x64", "63x64", "auto", "64", "x", " auto"]),
    ("/v1/chat/completions", CHAT_IMAGE, "ChatCompletionBody", "num_inference_steps",
     [0, 1, 200, 201, 2.5, "3", True]),
    ("/v1/chat/completions", CHAT_IMAGE, "ChatCompletionBody", "n", [0, 1, 4, 5]),
    ("/v1/chat/completions", CHAT_IMAGE, "ChatCompletionBody", "num_frames",
     [0, 1, 2, 5, 117, 121, 125]),
    ("/v1/chat/completions", CHAT_IMAGE, "ChatCompletionBody", "fps", [0, 5e-324, 0.0009, 0.001, 0.5, 120, 121]),
    ("/v1/chat/completions", CHAT_IMAGE, "ChatCompletionBody", "cfg_interval",
     [[0, 1], [0.4, 1.0], [-0.1, 1], [0, 1.5], [0.5], [0.1, 0.2, 0.3]]),
    ("/v1/chat/completions", CHAT_IMAGE, "ChatCompletionBody", "cfg_img_scale", [1.0, 1, 2.0]),
    ("/v1/chat/completions", CHAT_TEXT, "ChatCompletionBody", "modalities",
     [["text"], ["image"], ["video"], ["audio"], ["text", "image"], []]),
    ("/v1/chat/completions", CHAT_TEXT, "ChatCompletionBody", "max_tokens",
     [0, 1, 4096, 4097]),
    ("/v1/chat/completions", CHAT_TEXT, "ChatCompletionBody", "temperature",
     [-0.1, 0, 2, 2.1]),
    ("/v1/chat/completions", CHAT_TEXT, "ChatCompletionBody", "top_p", [0, 0.5, 1, 1.1]),
    ("/v1/chat/completions", CHAT_TEXT, "ChatCompletionBody", "stop",
     ["x", "", ["a", "b"], ["a", ""], ["1", "2", "3", "4", "5"]]),
    ("/v1/chat/completions", CHAT_TEXT, "ChatCompletionBody", "audio", [None, {}]),
    ("/v1/chat/completions", CHAT_TEXT, "ChatCompletionBody", "frequency_penalty", [0, 0.0, "0"]),
    ("/v1/chat/completions", CHAT_TEXT, "ChatCompletionBody", "no_such_field", [1]),
    ("/v1/images/generations", {"prompt": "a cat"}, "ImageGenerationBody", "output_format",
     ["png", "webp", "jpeg", "gif"]),
    ("/v1/images/generations", {"prompt": "a cat"}, "ImageGenerationBody", "output_compression",
     [-1, 0, 100, 101]),
    ("/v1/images/generations", {"prompt": "a cat"}, "ImageGenerationBody", "response_format",
     ["b64_json", "url"]),
    ("/v1/images/generations", {"prompt": "a cat"}, "ImageGenerationBody", "stream", [False, True]),
    ("/v1/images/generations", {"prompt": "a cat"}, "ImageGenerationBody", "modalities",
     [["image"], ["text"]]),
    ("/v1/images/generations", {"prompt": "a cat"}, "ImageGenerationBody", "prompt",
     ["a dog", "", "   "]),
    ("/v1/images/generations", {"prompt": "a cat"}, "ImageGenerationBody", "extra_body",
     [{"seed": 3}, {"seed": -3}, {"nope": 1}, {"extra_args": {"num_inference_steps": 300}}]),
    ("/v1/videos", {"prompt": "a cat"}, "VideoCreateBody", "seconds",
     [0, 4, 10, 11, "4", "4/3", " 10 ", "0.5", "12", -1]),
    ("/v1/videos", {"prompt": "a cat"}, "VideoCreateBody", "n", [1, 2]),
    ("/v1/videos", {"prompt": "a cat"}, "VideoCreateBody", "modalities", [["video"], ["image"]]),
    ("/v1/videos", {"prompt": "a cat"}, "VideoCreateBody", "input_reference",
     [{"file_id": "f"}, {"image_url": 3}]),
]


@pytest.mark.parametrize("path,base,component,name,values", AGREEMENT,
                         ids=[f"{a[0]}:{a[3]}" for a in AGREEMENT])
def test_schema_accepts_what_the_parser_accepts(client, spec, path, base, component, name, values):
    validator = _validator(spec, component)
    for value in values:
        body = dict(base, **{name: value})
        accepted = _status(client, path, body) == 503
        assert validator.is_valid(body) == accepted, (name, value, accepted)


def test_405_lists_every_method_of_the_path(client):
    r = client.put("/v1/videos/video_x")
    assert r.status_code == 405 and r.headers["allow"] == "DELETE, GET"
    ErrorResponse.model_validate(r.json())
    assert client.put("/v1/videos").headers["allow"] == "GET, POST"


def test_response_models_describe_what_the_builders_return(client):
    body = client.get("/v1/models").json()
    oai.ModelList.model_validate(body)
    lance = oai.lance_extension("t2i", ["seed"])
    image = oai.image_content("data:image/png;base64,AAAA")
    oai.ChatCompletion.model_validate(oai.chat_completion(
        "id", "m", [oai.chat_choice(0, image, "stop")], oai.usage(3, 4), lance))
    oai.ChatCompletion.model_validate(oai.chat_completion(
        "id", "m", [oai.chat_choice(0, "text", "length", [1, 2])], oai.usage(3, 4), lance))
    video_notes = dict(lance, num_frames=5, fps=12.0, size="64x64")
    oai.ChatCompletion.model_validate(oai.chat_completion(
        "id", "m", [oai.chat_choice(0, oai.video_content("data:video/mp4;base64,AA"), "stop")],
        oai.usage(3, 4), video_notes))
    for chunk in (oai.chat_chunk("id", "m", {"role": "assistant", "content": ""}, lance=lance),
                  oai.chat_chunk("id", "m", {}, lance_progress={"step": 1, "total": 2}),
                  oai.chat_chunk("id", "m", {"content": "x"}, token_ids=[3]),
                  oai.chat_chunk("id", "m", {}, finish_reason="stop"),
                  oai.usage_chunk("id", "m", oai.usage(1, 2))):
        oai.ChatCompletionChunk.model_validate(chunk)
    oai.ImagesResponse.model_validate(oai.images_response(["AAAA"], "64x64", oai.usage(1, 2),
                                                          lance, "png"))
    ErrorResponse.model_validate(OpenAIError("x", param="p", code="c").body())
    job = _Job(id="video_1", request=VideoRequest(task="t2v", prompt="a cat", num_frames=5),
               variant="Lance_3B_Video", model="m", size="64x64", seconds="0.333",
               created_at=1, expires_at=2, lance=oai.lance_extension("t2v", []))
    Video.model_validate(job.video_object())
    job.extra.update(num_frames=5, fps=12.0, prompt_tokens=3, target_tokens=4)
    job.status, job.progress, job.completed_at = "completed", 100, 2
    VideoList.model_validate({"object": "list", "data": [job.video_object()], "first_id": "video_1",
                              "last_id": "video_1", "has_more": False})
    VideoDeleted.model_validate({"id": "video_1", "object": "video.deleted", "deleted": True})


def test_the_documented_examples_are_valid_and_accepted(client, spec):
    seen = 0
    for path, item in spec["paths"].items():
        for method, op in item.items():
            content = op.get("requestBody", {}).get("content", {}).get("application/json", {})
            for name, example in content.get("examples", {}).items():
                component = content["schema"]["$ref"].rsplit("/", 1)[1]
                _validator(spec, component).validate(example["value"])
                if "{video_id}" not in path:   # a remix needs a finished video (no store here)
                    assert _status(client, path, example["value"]) == 503, (path, name)
                seen += 1
    assert seen >= 8


def test_a_remix_refuses_input_reference_as_its_schema_says(client, spec):
    body = {"prompt": "the cube turns blue", "input_reference": {"image_url": "data:image/png;base64,AA"}}
    assert not _validator(spec, "VideoRemixBody").is_valid(body)
    r = client.post("/v1/videos/video_x/remix", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "input_reference"


def _not_a_json_number(constant: str):
    raise ValueError(f"{constant} is not JSON")   # json.loads would read NaN / Infinity


FORM_AGREEMENT = [   # (form field, text values): form text as the server reads it
    ("stream", ["false", "0", "No", "true", "1", "maybe"]),
    ("lossless", ["true", "Y", "off", "2", ""]),
    ("num_inference_steps", ["2", "200", "201", "0", "two"]),
    ("size", ["64x64", "1024x1024", "1040x64"]),
    # other servers' fields: typed as in a JSON body (on image output any valid value is ignored)
    ("logprobs", ["true", "false", "maybe", "2"]),
    ("frequency_penalty", ["0.5", "-1", "x", "NaN"]),
    ("top_k", ["5", "-1", "five", "1.5"]),
]


@pytest.mark.parametrize("name,values", FORM_AGREEMENT, ids=[f[0] for f in FORM_AGREEMENT])
def test_form_schema_accepts_what_the_form_parser_accepts(client, spec, name, values):
    from helpers import png_bytes
    validator = _validator(spec, "ImageEditForm")
    for value in values:
        r = client.post("/v1/images/edits", data={"prompt": "make it blue", name: value},
                        files={"image": ("cube.png", png_bytes(), "image/png")})
        assert r.status_code in (400, 503), r.text
        prop = _resolve(spec, _resolve(spec, {"$ref": "#/components/schemas/ImageEditForm"})[
            "properties"][name])
        typed = value   # the schema's integer / number of a form field is its text
        types = {b.get("type") for b in prop.get("anyOf", [prop])}
        if types and types <= {"integer", "number"}:
            try:
                typed = json.loads(value, parse_constant=_not_a_json_number)
            except ValueError:
                pass
        valid = validator.is_valid({"prompt": "make it blue", "image": "<bytes>", name: typed})
        assert valid == (r.status_code == 503), (name, value, r.status_code, r.text)
