"""The OpenAI parsing and validation layer of the ingress (spec §7.3 request formats).

Valid requests are parsed with the real parser (bodies recorded from the real OpenAI SDK where the
SDK is the client) and sent through the real FastAPI app, where they must pass validation and reach
the stage call (503 here: no stages are connected without Ray). Every invalid request must come back
from the app as a 4xx OpenAI error body. End-to-end tests with Ray Serve and the real stages live in
tests/test_serve_e2e.py (written when the stages land).
"""
from __future__ import annotations

import asyncio
import io
import json

import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from starlette.requests import Request

from helpers import data_url, png_bytes
from serve_app.errors import stage_error
from serve_app.ingress import IngressSettings, LanceService, build_fastapi_app
from serve_app.knobs import RequestLimits
from serve_app.request_parsing import (form_fields, parse_chat_request, parse_edit_form,
                                       parse_generation_json)
from stages.lance.requests import DenoiseParams, ImageEncoding, ImageRequest, TextRequest

LIMITS = RequestLimits()


IMG = data_url(png_bytes())


def user(text="A red cube on a blue table", *images):
    if not images:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [{"type": "text", "text": text}]
            + [{"type": "image_url", "image_url": {"url": u}} for u in images]}


def parse(body: dict, limits: RequestLimits = LIMITS):
    return asyncio.run(parse_chat_request(json.dumps(body).encode(), limits))


def make_client(**settings) -> TestClient:
    s = IngressSettings(served_model_name="lance-test", model_path="/models/lance", **settings)
    return TestClient(build_fastapi_app(LanceService(s)), raise_server_exceptions=False)


@pytest.fixture
def client():
    return make_client()


@pytest.fixture
def sdk(client):
    """The real OpenAI SDK talking to the ingress app; `sdk.sent` holds the raw requests."""
    sent: list[httpx.Request] = []
    client.event_hooks = {"request": [lambda r: sent.append(r)], "response": []}
    c = openai.OpenAI(api_key="unused", base_url="http://testserver/v1", http_client=client,
                      max_retries=0)
    c.sent = sent
    return c


def assert_reached_stages(exc_info):
    """A valid request passes every check and fails only at the (unconnected) stage call."""
    err = exc_info.value
    assert err.status_code == 503, err
    assert err.body["code"] == "stage_unavailable"


def assert_openai_error(resp, status: int, param=..., code=...):
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    assert body["error"]["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    if param is not ...:
        assert body["error"]["param"] == param, body
    if code is not ...:
        assert body["error"]["code"] == code, body
    return body["error"]


# -- request formats --------------------------------------------------------------------------------

def test_sdk_extra_body_is_flattened_and_read(sdk):
    knobs = {"modalities": ["image"], "size": "512x768", "num_inference_steps": 12, "seed": 7,
             "cfg_text_scale": 5.0, "timestep_shift": 3.0, "cfg_interval": [0.3, 0.9],
             "negative_prompt": "blurry", "cfg_renorm_type": "channel", "cfg_renorm_min": 0.1}
    with pytest.raises(openai.APIStatusError) as e:
        sdk.chat.completions.create(model="lance-test", messages=[user()], extra_body=knobs)
    assert_reached_stages(e)
    wire = json.loads(sdk.sent[-1].content)
    assert "extra_body" not in wire and wire["num_inference_steps"] == 12   # the SDK flattened it
    req = parse(wire).request
    assert isinstance(req, ImageRequest) and req.task == "t2i"
    assert (req.height, req.width) == (768, 512)
    assert req.negative_prompt == "blurry"
    assert req.params == DenoiseParams(num_inference_steps=12, timestep_shift=3.0, cfg_text_scale=5.0,
                                       cfg_interval=(0.3, 0.9), cfg_renorm_type="channel",
                                       cfg_renorm_min=0.1, seed=7)


def test_raw_json_with_nested_extra_body(client):
    body = {"model": "lance-test", "messages": [user()],
            "extra_body": {"modalities": ["image"], "height": 256, "width": 320,
                           "num_inference_steps": 4, "seed": 1}}
    req = parse(body).request
    assert req.task == "t2i" and (req.height, req.width) == (256, 320)
    assert req.params.num_inference_steps == 4 and req.params.seed == 1
    assert client.post("/v1/chat/completions", json=body).status_code == 503


def test_top_level_fields_as_vllm_omni_clients_send_them():
    req = parse({"messages": [user()], "modalities": ["image"], "height": 768, "width": 768,
                 "num_inference_steps": 30, "seed": 42, "cfg_text_scale": 4.0,
                 "timestep_shift": 3.5}).request
    assert req.task == "t2i" and (req.height, req.width) == (768, 768)
    assert req.params == DenoiseParams()


def test_extra_args_top_level_and_nested_in_extra_body():
    req = parse({"messages": [user()], "modalities": ["image"],
                 "extra_args": {"cfg_text_scale": 2.5, "cfg_interval": [0.0, 1.0]}}).request
    assert req.params.cfg_text_scale == 2.5 and req.params.cfg_interval == (0.0, 1.0)
    req = parse({"messages": [user()],
                 "extra_body": {"modalities": ["image"], "extra_args": {"timestep_shift": 2.0}}}).request
    assert req.params.timestep_shift == 2.0


def test_the_same_knob_twice_must_agree(client):
    same = parse({"messages": [user()], "modalities": ["image"], "seed": 5,
                  "extra_body": {"seed": 5}, "extra_args": {"seed": 5}}).request
    assert same.params.seed == 5
    r = client.post("/v1/chat/completions", json={"messages": [user()], "modalities": ["image"],
                                                  "seed": 5, "extra_args": {"seed": 6}})
    err = assert_openai_error(r, 400, param="seed", code="conflicting_values")
    assert "top level: 5" in err["message"] and "extra_args: 6" in err["message"]


def test_defaults_are_upstreams_when_nothing_is_set():
    req = parse({"messages": [user()], "modalities": ["image"]}).request
    assert req.params == DenoiseParams() and req.height is None and req.width is None
    assert req.system_prompt is None and req.negative_prompt is None


@pytest.mark.parametrize("text, prompt", [
    ("<|im_start|>A red cube<|im_end|>", "A red cube"),
    ("<|im_start|>user\nA red cube<|im_end|>\n<|im_start|>assistant\n", "A red cube"),
    ("A red cube", "A red cube"),
])
def test_im_start_wrapping_is_unwrapped(text, prompt):
    assert parse({"messages": [user(text)], "modalities": ["image"]}).request.prompt == prompt


def test_rendered_template_gives_system_and_user_text():
    tmpl = ("<|im_start|>system\nDescribe the image.<|im_end|>\n<|im_start|>user\nA cat<|im_end|>\n"
            "<|im_start|>assistant\n<|vision_start|><|video_pad|><|vision_end|><|im_end|>")
    req = parse({"messages": [user(tmpl)], "modalities": ["image"]}).request
    assert req.prompt == "A cat" and req.system_prompt == "Describe the image."


def test_system_message_sets_lances_system_prompt():
    img = parse({"messages": [{"role": "system", "content": "Be vivid."}, user()],
                 "modalities": ["image"]}).request
    assert img.system_prompt == "Be vivid."
    chat = parse({"messages": [{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
                               user("hi")]}).request
    assert chat.system_prompt == "Be brief." and [t.role for t in chat.turns] == ["user"]
    same = parse({"messages": [{"role": "system", "content": "S"}, user()], "system_prompt": "S"})
    assert same.request.system_prompt == "S"


@pytest.mark.parametrize("size, hw", [("512x768", (768, 512)), ("1024x64", (64, 1024)),
                                      ("auto", (None, None))])
def test_size_string_is_width_by_height(size, hw):
    req = parse({"messages": [user()], "modalities": ["image"], "size": size}).request
    assert (req.height, req.width) == hw


def test_routing_to_the_four_tasks():
    t2i = parse({"messages": [user()], "modalities": ["image"]}).request
    edit = parse({"messages": [user("Make it green", IMG)], "modalities": ["image"]}).request
    x2t = parse({"messages": [user("What is this?", IMG)], "modalities": ["text"]}).request
    chat = parse({"messages": [user("Hello")]}).request   # modalities default to ["text"]
    assert isinstance(t2i, ImageRequest) and t2i.task == "t2i" and t2i.image is None
    assert isinstance(edit, ImageRequest) and edit.task == "image_edit"
    assert edit.image.size == (40, 30) and edit.image.mode == "RGB" and edit.prompt == "Make it green"
    assert isinstance(x2t, TextRequest) and x2t.task == "x2t_image" and x2t.image.size == (40, 30)
    assert isinstance(chat, TextRequest) and chat.task == "chat" and chat.image is None


def test_x2t_image_without_question_is_allowed_and_modalities_in_extra_body_route():
    req = parse({"messages": [{"role": "user", "content": [{"type": "image_url",
                                                            "image_url": {"url": IMG}}]}],
                 "extra_body": {"modalities": ["text"]}}).request
    assert req.task == "x2t_image" and req.turns[0].text == ""


def test_an_earlier_answer_with_special_token_strings_continues_the_conversation():
    # a user's text may not smuggle special tokens in (400 below); the model's own earlier answer,
    # sent back as history, may hold them: they are dropped from it
    req = parse({"messages": [user("hi"), {"role": "assistant", "content": "a<|vision_start|>b<|im_end|>"},
                              user("more")]}).request
    assert [(t.role, t.text) for t in req.turns] == [("user", "hi"), ("assistant", "ab"), ("user", "more")]


def test_text_sampling_fields():
    req = parse({"messages": [user("hi"), {"role": "assistant", "content": "hello"}, user("more")],
                 "max_completion_tokens": 40, "temperature": 0.7, "top_p": 0.9, "stop": "END",
                 "seed": 3}).request
    assert [(t.role, t.text) for t in req.turns] == [("user", "hi"), ("assistant", "hello"),
                                                     ("user", "more")]
    assert (req.max_tokens, req.temperature, req.top_p, req.stop, req.seed) == (40, 0.7, 0.9, ["END"], 3)
    greedy = parse({"messages": [user("hi")]}).request
    assert (greedy.max_tokens, greedy.temperature, greedy.top_p) == (256, 0.0, 1.0)
    sampled = parse({"messages": [user("q", IMG)], "do_sample": True}).request
    assert sampled.temperature == 0.3   # vLLM-Omni's text_temperature default
    assert parse({"messages": [user("q")], "text_temperature": 0.5}).request.temperature == 0.5


def test_stream_flags():
    parsed = parse({"messages": [user()], "stream": True, "stream_options": {"include_usage": True}})
    assert parsed.stream and parsed.include_usage
    assert not parse({"messages": [user()]}).stream


def test_generic_openai_fields_are_accepted(client):
    body = {"model": "lance-test", "messages": [user()], "user": "u1", "metadata": {"k": "v"},
            "store": False, "temperature": 1, "max_tokens": 10, "n": 1, "frequency_penalty": 0,
            "response_format": {"type": "text"}, "tool_choice": "none", "modalities": ["image"]}
    parsed = parse(body)
    assert isinstance(parsed.request, ImageRequest)
    # sampling fields do not apply to images; bookkeeping changes nothing: both are reported.
    # Neutral values (store false, n 1, a zero penalty, no tools) ask for nothing: not reported.
    assert parsed.ignored_params == ["max_tokens", "metadata", "response_format", "temperature", "user"]
    assert client.post("/v1/chat/completions", json=body).status_code == 503


# -- liberal in what applies: valid knobs that do not apply are ignored and reported ----------------

def lance_client_payload(modality: str, image_url: str | None = None) -> dict:
    """What ../shared/clients/lance_openai_chat_client.py sends with its defaults (the e2e test runs
    the client itself): height/width 512, 25 steps and seed 42 whatever the modality."""
    content = [{"type": "text", "text": "<|im_start|>A cute cat<|im_end|>"}]
    if image_url:
        content.append({"type": "image_url", "image_url": {"url": image_url}})
    return {"messages": [{"role": "user", "content": content}],
            "modalities": ["image"] if modality in ("text2img", "img2img") else ["text"],
            "height": 512, "width": 512, "num_inference_steps": 25, "seed": 42}


@pytest.mark.parametrize("modality, image, task, ignored", [
    ("text2img", None, "t2i", []),
    ("img2img", IMG, "image_edit", ["height", "width"]),
    ("img2text", IMG, "x2t_image", ["height", "num_inference_steps", "seed", "width"]),
    ("text2text", None, "chat", ["height", "num_inference_steps", "seed", "width"]),
])
def test_the_lance_clients_defaults_are_accepted(client, modality, image, task, ignored):
    parsed = parse(lance_client_payload(modality, image))
    assert (parsed.task, parsed.request.task, parsed.ignored_params) == (task, task, ignored)
    if task == "t2i":
        assert (parsed.request.height, parsed.request.width) == (512, 512)
        assert parsed.request.params == DenoiseParams(num_inference_steps=25, seed=42)
    if task == "image_edit":   # the output keeps the input's bucketed size; the knobs that apply do
        assert (parsed.request.height, parsed.request.width) == (None, None)
        assert parsed.request.params == DenoiseParams(num_inference_steps=25, seed=42)
    assert client.post("/v1/chat/completions", json=lance_client_payload(modality, image)).status_code == 503


def test_seed_applies_to_sampled_text():
    parsed = parse({"messages": [user("hi")], "seed": 3, "temperature": 0.5})
    assert parsed.request.seed == 3 and parsed.ignored_params == []


@pytest.mark.parametrize("name", ["cfg_text_scale", "guidance_scale", "true_cfg_scale", "cfg_scale"])
def test_the_ecosystems_guidance_names_are_lances_cfg_text_scale(name):
    parsed = parse({"messages": [user()], "modalities": ["image"], name: 2.5})
    assert parsed.request.params.cfg_text_scale == 2.5 and parsed.ignored_params == []
    both = parse({"messages": [user()], "modalities": ["image"], name: 2.5, "guidance_scale": 2.5,
                  "extra_body": {"cfg_text_scale": 2.5}})
    assert both.request.params.cfg_text_scale == 2.5
    edit = parse({"messages": [user("x", IMG)], "modalities": ["image"], name: 1.5})
    assert edit.request.params.cfg_text_scale == 1.5 and edit.ignored_params == []
    text = parse({"messages": [user("hi")], name: 1.5})
    assert text.ignored_params == [name]


@pytest.mark.parametrize("name", ["n", "num_outputs_per_prompt"])
def test_n_images_per_chat_completion(name):
    parsed = parse({"messages": [user()], "modalities": ["image"], name: 3, "seed": 7})
    assert [r.params.seed for r in parsed.requests] == [7, 8, 9]
    assert len({r.request_id for r in parsed.requests}) == 3 and parsed.ignored_params == []
    assert len(parse({"messages": [user()], "modalities": ["image"], "n": 2,
                      "num_outputs_per_prompt": 2}).requests) == 2
    assert len(parse({"messages": [user("hi")], name: 1}).requests) == 1


def test_knobs_that_do_not_apply_to_the_task_are_ignored_and_reported():
    t2i = parse(chat(modalities=["image"], resolution="image_256res", do_sample=True,
                     guidance_scale_2=2.0, return_token_ids=True, stop="x"))
    assert t2i.request.task == "t2i" and t2i.request.resolution == "image_768res"
    assert t2i.ignored_params == ["do_sample", "guidance_scale_2", "resolution", "return_token_ids", "stop"]
    assert not t2i.return_token_ids
    edit = parse({"messages": [user("x", IMG)], "modalities": ["image"], "size": "512x512",
                  "negative_prompt": "blurry", "resolution": "image_256res", "timestep_shift": 2.0})
    assert edit.request.task == "image_edit" and edit.request.negative_prompt is None
    assert edit.request.resolution == "image_256res" and edit.request.params.timestep_shift == 2.0
    assert edit.ignored_params == ["negative_prompt", "size"]
    x2t = parse({"messages": [user("q", IMG)], "resolution": "image_256res", "cfg_interval": [0.1, 0.9],
                 "timestep_shift": 3.0, "negative_prompt": "n", "cfg_img_scale": 1.0, "max_tokens": 5})
    assert x2t.request.task == "x2t_image" and x2t.request.resolution == "image_256res"
    assert x2t.ignored_params == ["cfg_img_scale", "cfg_interval", "negative_prompt", "timestep_shift"]
    chat_ = parse(chat(resolution="image_512res", size="256x256"))
    assert chat_.request.task == "chat" and chat_.ignored_params == ["resolution", "size"]


def test_other_servers_fields_neutral_values_pass_and_the_rest_is_reported_or_refused():
    vllm_defaults = {"top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0, "length_penalty": 1.0,
                     "skip_special_tokens": True, "spaces_between_special_tokens": True,
                     "add_generation_prompt": True, "echo": False, "ignore_eos": False, "min_tokens": 0,
                     "stop_token_ids": [], "include_stop_str_in_output": False, "logprobs": False,
                     "presence_penalty": 0, "frequency_penalty": 0.0, "tools": [], "tool_choice": "auto",
                     "parallel_tool_calls": True, "separate_reasoning": True, "stream_reasoning": True}
    assert parse(chat(**vllm_defaults)).ignored_params == []
    assert parse(chat(modalities=["image"], **vllm_defaults)).ignored_params == []
    hints = parse(chat(chat_template_kwargs={"enable_thinking": False}, priority=5, request_id="r1",
                       reasoning_effort="low", mm_processor_kwargs={"max_pixels": 100}))
    assert hints.ignored_params == ["chat_template_kwargs", "mm_processor_kwargs", "priority",
                                    "reasoning_effort", "request_id"]
    # sampling fields Lance does not implement are a 400 on text output, ignored on image output
    image = parse(chat(modalities=["image"], top_k=40, repetition_penalty=1.2, logprobs=True))
    assert image.ignored_params == ["logprobs", "repetition_penalty", "top_k"]
    # and they are read wherever knobs are read
    nested = parse({"messages": [user("hi")], "extra_body": {"user": "u", "top_k": -1}})
    assert nested.ignored_params == ["user"]


def test_refusals_say_what_to_send_instead(client):
    err = assert_openai_error(client.post("/v1/chat/completions", json=chat(top_k=40)), 400, "top_k")
    assert "send -1" in err["message"]
    err = assert_openai_error(client.post("/v1/chat/completions", json=chat(repetition_penalty=1.1)), 400)
    assert "send 1" in err["message"]
    err = assert_openai_error(client.post("/v1/chat/completions", json=chat(n=3)), 400, "n")
    assert "send several requests" in err["message"]


def test_client_facing_messages_cite_no_internal_document():
    from serve_app.other_fields import OTHER_FIELDS

    for name, field in OTHER_FIELDS.items():
        assert field.refuse is None or ("spec" not in field.refuse and "§" not in field.refuse), name


def test_the_readme_table_decides_every_field():
    """The README's "Fields of other servers" table names every field other_fields.py decides, and
    every Lance knob (with its other names)."""
    from pathlib import Path

    from serve_app.knobs import GenerationKnobs
    from serve_app.other_fields import OTHER_FIELDS

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme[readme.index("### Fields of other servers"):]
    table = table[:table.index("\n### ")]
    missing = [name for name in [*OTHER_FIELDS, *GenerationKnobs.model_fields] if f"`{name}`" not in table]
    assert not missing, f"not in the README's table: {missing}"


def test_a_vllm_style_vision_request():
    """What vLLM's docs and clients send for image understanding: a string system message, an
    image_url with detail, max_completion_tokens."""
    body = {"model": "lance-test", "max_completion_tokens": 64, "temperature": 0,
            "messages": [{"role": "system", "content": "You are a careful observer."},
                         {"role": "user", "content": [
                             {"type": "text", "text": "What is in this image?"},
                             {"type": "image_url", "image_url": {"url": IMG, "detail": "high"}}]}]}
    parsed = parse(body)
    req = parsed.request
    assert req.task == "x2t_image" and req.system_prompt == "You are a careful observer."
    assert req.max_tokens == 64 and req.image.size == (40, 30) and parsed.ignored_params == []
    assert [(t.role, t.text) for t in req.turns] == [("user", "What is in this image?")]


def test_images_api_reads_guidance_scale_and_reports_what_it_ignores():
    parsed = parse_generation_json(json.dumps({
        "prompt": "a cube", "size": "256x256", "n": 2, "guidance_scale": 3.0, "quality": "hd",
        "style": "vivid", "user": "u", "resolution": "image_512res", "background": "auto"}).encode(), LIMITS)
    assert {r.params.cfg_text_scale for r in parsed.requests} == {3.0} and len(parsed.requests) == 2
    assert parsed.task == "t2i" and parsed.ignored_params == ["quality", "resolution", "style", "user"]
    parsed = parse_generation_json(json.dumps({"prompt": "a", "num_outputs_per_prompt": 3}).encode(), LIMITS)
    assert len(parsed.requests) == 3
    image = Image.open(io.BytesIO(png_bytes()))
    (edit,) = parse_edit_form({"prompt": "make it blue", "size": "512x512", "true_cfg_scale": "2.0",
                               "negative_prompt": "x", "quality": "high"}, image, LIMITS).requests
    assert edit.task == "image_edit" and edit.params.cfg_text_scale == 2.0 and edit.height is None
    ignored = parse_edit_form({"prompt": "b", "size": "512x512", "quality": "high"}, image, LIMITS).ignored_params
    assert ignored == ["quality", "size"]


def test_images_generations_sdk(sdk):
    with pytest.raises(openai.APIStatusError) as e:
        sdk.images.generate(model="lance-test", prompt="A red cube", n=3, size="512x512",
                            response_format="b64_json",
                            extra_body={"num_inference_steps": 8, "seed": 10})
    assert_reached_stages(e)
    parsed = parse_generation_json(sdk.sent[-1].content, LIMITS)
    assert [r.params.seed for r in parsed.requests] == [10, 11, 12]   # n images, n seeds
    assert {(r.height, r.width, r.params.num_inference_steps, r.task) for r in parsed.requests} == {
        (512, 512, 8, "t2i")}
    assert len({r.request_id for r in parsed.requests}) == 3
    assert {r.encoding for r in parsed.requests} == {ImageEncoding()}   # PNG unless asked


@pytest.mark.parametrize("fmt, compression, want", [
    ("webp", 80, ImageEncoding("webp", 80)), ("jpeg", None, ImageEncoding("jpeg", 100)),
    ("png", 50, ImageEncoding("png")),   # a PNG is lossless: output_compression does not apply
])
def test_images_output_format_reaches_every_image(sdk, fmt, compression, want):
    extra = {} if compression is None else {"output_compression": compression}
    with pytest.raises(openai.APIStatusError):
        sdk.images.generate(model="lance-test", prompt="A red cube", n=2, output_format=fmt, **extra)
    parsed = parse_generation_json(sdk.sent[-1].content, LIMITS)
    assert [r.encoding for r in parsed.requests] == [want, want]


def _form_of(request: httpx.Request):
    async def receive():
        return {"type": "http.request", "body": request.content, "more_body": False}

    async def read():
        scope = {"type": "http", "method": "POST",
                 "headers": [(b"content-type", request.headers["content-type"].encode())]}
        form = await Request(scope, receive).form()
        texts = [(k, v) for k, v in form.multi_items() if isinstance(v, str)]
        files = {k: await v.read() for k, v in form.multi_items() if not isinstance(v, str)}
        return texts, files
    return asyncio.run(read())


def test_images_edits_sdk_multipart(sdk):
    with pytest.raises(openai.APIStatusError) as e:
        sdk.images.edit(model="lance-test", image=("cube.png", png_bytes(), "image/png"),
                        prompt="Make the cube green",
                        extra_body={"num_inference_steps": 5, "cfg_interval": [0.2, 1.0],
                                    "extra_args": {"seed": 9}})
    assert_reached_stages(e)
    texts, files = _form_of(sdk.sent[-1])
    image = Image.open(io.BytesIO(files["image"]))
    (req,) = parse_edit_form(form_fields(texts), image, LIMITS).requests
    assert req.task == "image_edit" and req.prompt == "Make the cube green"
    assert req.params.num_inference_steps == 5 and req.params.cfg_interval == (0.2, 1.0)
    assert req.params.seed == 9 and req.image.size == (40, 30)


def test_models_shows_the_served_model(client):
    r = client.get("/v1/models")
    assert r.status_code == 200
    (model,) = r.json()["data"]
    assert model["id"] == "lance-test" and model["root"] == "/models/lance"
    assert model["lance"]["tiny_random_weights"] is False and model["lance"]["max_image_side"] == 1024
    tiny = make_client(tiny_random_weights=True).get("/v1/models").json()["data"][0]
    assert tiny["lance"]["tiny_random_weights"] is True


def test_health_is_not_ready_without_both_stages(client):
    r = client.get("/health")
    assert r.status_code == 503
    assert r.json()["stages"] == {"thinker": "not connected", "dit": "not connected"}
    assert r.json()["error"]["code"] == "not_ready"


# -- every invalid request -> 4xx OpenAI error ------------------------------------------------------

def chat(**fields):
    return {"messages": [user()], **fields}


BAD_CHAT = [
    ("audio modality", chat(modalities=["audio"]), 400, "modalities", "unsupported_modality"),
    ("two modalities", chat(modalities=["image", "text"]), 400, "modalities", "unsupported_modality"),
    # a video task on an image-only deployment names the graphs that serve it
    ("video modality", chat(modalities=["video"]), 400, "modalities", "task_not_served"),
    ("size not /16", chat(modalities=["image"], size="500x512"), 400, "width", "invalid_size"),
    ("height not /16", chat(modalities=["image"], height=520, width=512), 400, "height", "invalid_size"),
    ("size too big", chat(modalities=["image"], size="2048x2048"), 400, "height", "invalid_size"),
    ("size too small", chat(modalities=["image"], size="32x32"), 400, "height", "invalid_size"),
    ("size garbage", chat(modalities=["image"], size="big"), 400, "size", "invalid_size"),
    ("height alone", chat(modalities=["image"], height=512), 400, "width", "invalid_size"),
    ("size vs height", chat(modalities=["image"], size="512x512", height=768, width=768), 400,
     "size", "conflicting_values"),
    ("steps 0", chat(modalities=["image"], num_inference_steps=0), 400, "num_inference_steps", "invalid_value"),
    ("steps 201", chat(modalities=["image"], num_inference_steps=201), 400, "num_inference_steps", "invalid_value"),
    ("negative seed", chat(modalities=["image"], seed=-1), 400, "seed", "invalid_value"),
    ("cfg_interval order", chat(modalities=["image"], cfg_interval=[0.9, 0.1]), 400, "cfg_interval", "invalid_value"),
    ("cfg_interval length", chat(modalities=["image"], cfg_interval=[0.1]), 400, ..., ...),
    ("timestep_shift 0", chat(modalities=["image"], timestep_shift=0), 400, "timestep_shift", "invalid_value"),
    ("renorm type", chat(modalities=["image"], cfg_renorm_type="local"), 400, "cfg_renorm_type", "invalid_value"),
    ("image cfg", chat(modalities=["image"], cfg_img_scale=2.0), 400, "cfg_img_scale", "invalid_value"),
    ("video knob not 4k+1", chat(modalities=["image"], num_frames=25 + 1), 400, "num_frames", "invalid_value"),
    ("think", chat(modalities=["image"], extra_args={"think": True}), 400, "think", "unsupported_parameter"),
    ("typo knob", chat(modalities=["image"], num_inference_step=3), 400, "num_inference_step", "unknown_parameter"),
    ("typo in extra_body", chat(extra_body={"heigth": 512}), 400, "heigth", "unknown_parameter"),
    ("broken base64", {"messages": [user("x", "data:image/png;base64,!!!notbase64")],
                       "modalities": ["image"]}, 400, "messages[0].content[1]", "invalid_base64"),
    ("not an image", {"messages": [user("x", data_url(b"hello, not a picture"))], "modalities": ["image"]},
     400, "messages[0].content[1]", "invalid_image"),
    ("truncated png", {"messages": [user("x", data_url(png_bytes()[:60]))], "modalities": ["image"]},
     400, "messages[0].content[1]", "invalid_image"),
    ("non-image data url", {"messages": [user("x", data_url(b"abc", "text/plain"))], "modalities": ["image"]},
     400, "messages[0].content[1]", "invalid_image_url"),
    ("two images", {"messages": [user("x", IMG, IMG)], "modalities": ["image"]}, 400,
     "messages[0].content[2]", "too_many_images"),
    ("remote url disabled", {"messages": [user("x", "https://example.com/cat.png")]}, 400,
     "messages[0].content[1]", "remote_images_disabled"),
    ("file url", {"messages": [user("x", "file:///etc/passwd")]}, 400, "messages[0].content[1]",
     "invalid_image_url"),
    ("image from assistant", {"messages": [user("x"), {"role": "assistant", "content": [
        {"type": "image_url", "image_url": {"url": IMG}}]}, user("y")]}, 400,
     "messages[1].content[0]", "invalid_image_position"),
    ("x2t image not first", {"messages": [user("a"), {"role": "assistant", "content": "b"},
                                          user("c", IMG)]}, 400, "messages[2].content[1]",
     "invalid_image_position"),
    ("special token", {"messages": [user("a <|vision_start|> b")], "modalities": ["image"]}, 400,
     "messages[0].content", "invalid_prompt"),
    ("empty prompt", {"messages": [user("<|im_start|><|im_end|>")], "modalities": ["image"]}, 400,
     "messages", "invalid_prompt"),
    ("no user message", {"messages": [{"role": "system", "content": "s"}]}, 400, "messages", "invalid_value"),
    ("last is assistant", {"messages": [user("a"), {"role": "assistant", "content": "b"}]}, 400,
     "messages", "invalid_value"),
    ("system conflict", {"messages": [{"role": "system", "content": "A"}, user()], "system_prompt": "B"},
     400, "system_prompt", "conflicting_values"),
    ("n=2 for text", chat(n=2), 400, "n", "unsupported_parameter"),
    ("n=2 streamed image", chat(modalities=["image"], n=2, stream=True), 400, "n", "unsupported_parameter"),
    ("n above max", chat(modalities=["image"], num_outputs_per_prompt=5), 400, "num_outputs_per_prompt",
     "invalid_value"),
    ("n 0", chat(modalities=["image"], n=0), 400, "n", "invalid_value"),
    ("two n names disagree", chat(modalities=["image"], n=2, num_outputs_per_prompt=3), 400,
     "num_outputs_per_prompt", "conflicting_values"),
    ("guidance names disagree", chat(modalities=["image"], cfg_text_scale=4.0, guidance_scale=5.0), 400,
     "guidance_scale", "conflicting_values"),
    ("guidance out of range", chat(modalities=["image"], guidance_scale=500), 400, "guidance_scale",
     "invalid_value"),
    ("true_cfg_scale string", chat(modalities=["image"], true_cfg_scale="4"), 400, "true_cfg_scale",
     "invalid_type"),
    ("invalid size on text", chat(height=100, width=512), 400, "height", "invalid_size"),
    ("invalid steps on text", chat(num_inference_steps=0), 400, "num_inference_steps", "invalid_value"),
    ("invalid size on edit", {"messages": [user("x", IMG)], "modalities": ["image"], "size": "1000x1000"},
     400, "height", "invalid_size"),
    ("invalid temperature on image", chat(modalities=["image"], temperature=3), 400, "temperature",
     "invalid_value"),
    ("invalid text knob on image", chat(modalities=["image"], text_temperature=5), 400,
     "text_temperature", "invalid_value"),
    ("top_k on text", chat(top_k=40), 400, "top_k", "unsupported_parameter"),
    ("penalty on text", chat(frequency_penalty=0.5), 400, "frequency_penalty", "unsupported_parameter"),
    ("guided decoding", chat(guided_json={"type": "object"}), 400, "guided_json", "unsupported_parameter"),
    ("chat_template", chat(chat_template="{{ x }}"), 400, "chat_template", "unsupported_parameter"),
    ("lora", chat(modalities=["image"], lora={"name": "x"}), 400, "lora", "unsupported_parameter"),
    ("top_k wrong type", chat(top_k="40"), 400, "top_k", "invalid_type"),
    ("user wrong type", chat(user=5), 400, "user", "invalid_type"),
    ("modalities in extra_args", chat(extra_args={"modalities": ["audio"]}), 400, "modalities",
     "unsupported_modality"),
    ("modalities conflict", chat(modalities=["image"], extra_body={"modalities": ["text"]}), 400,
     "modalities", "conflicting_values"),
    ("tools", chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools", "unsupported_parameter"),
    ("logprobs", chat(logprobs=True), 400, "logprobs", "unsupported_parameter"),
    ("max_tokens 0", chat(max_tokens=0), 400, "max_tokens", "invalid_value"),
    ("max_tokens > context", chat(max_tokens=10**6), 400, "max_tokens", "invalid_value"),
    ("temperature 3", chat(temperature=3), 400, "temperature", "invalid_value"),
    ("top_p 0", chat(top_p=0), 400, "top_p", "invalid_value"),
    ("five stops", chat(stop=["a", "b", "c", "d", "e"]), 400, "stop", "invalid_value"),
    ("json mode", chat(response_format={"type": "json_object"}), 400, "response_format.type", "invalid_value"),
    ("wrong type messages", {"messages": "hello"}, 400, "messages", "invalid_type"),
    ("empty messages", {"messages": []}, 400, "messages", ...),
    ("missing messages", {"model": "x"}, 400, "messages", "missing_required_parameter"),
    ("tool role", {"messages": [{"role": "tool", "content": "x"}]}, 400, "messages.0.role", ...),
    ("audio part", {"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, 400, ..., ...),
    ("temperature string", chat(temperature="hot"), 400, "temperature", "invalid_type"),
    ("height string", chat(modalities=["image"], height="512", width=512), 400, "height", "invalid_type"),
    ("stream string", chat(stream="yes"), 400, "stream", "invalid_type"),
    ("extra_body not object", chat(extra_body="x"), 400, "extra_body", "invalid_type"),
    ("extra_args list", chat(extra_args=[1]), 400, "extra_args", "invalid_type"),
    ("modalities string", chat(modalities="image"), 400, "modalities", "invalid_type"),
]


@pytest.mark.parametrize("body, status, param, code", [c[1:] for c in BAD_CHAT],
                         ids=[c[0] for c in BAD_CHAT])
def test_invalid_chat_request_is_an_openai_4xx(client, body, status, param, code):
    assert_openai_error(client.post("/v1/chat/completions", json=body), status, param, code)


def test_malformed_json_is_400_not_422(client):
    r = client.post("/v1/chat/completions", content=b'{"messages": [', headers={"content-type": "application/json"})
    assert_openai_error(r, 400, code="invalid_json")
    r = client.post("/v1/images/generations", content=b"not json")
    assert_openai_error(r, 400, code="invalid_json")


def test_unknown_model_is_404(client):
    assert_openai_error(client.post("/v1/chat/completions", json=chat(model="gpt-4o")), 404,
                        "model", "model_not_found")


def test_oversized_body_is_413():
    small = make_client(limits=RequestLimits(max_image_bytes=1000, max_video_bytes=1000))
    big = b'{"messages": [{"role": "user", "content": "' + b"x" * (5 * 2**20) + b'"}]}'
    assert_openai_error(small.post("/v1/chat/completions", content=big), 413, code="request_too_large")


def test_image_over_the_byte_limit_is_400():
    small = make_client(limits=RequestLimits(max_image_bytes=100))
    r = small.post("/v1/chat/completions", json={"messages": [user("x", IMG)], "modalities": ["image"]})
    assert_openai_error(r, 400, code="image_too_large")


def test_unknown_route_and_wrong_method_keep_the_openai_shape(client):
    assert_openai_error(client.get("/v1/nothing"), 404)
    r = client.get("/v1/chat/completions")
    assert r.status_code == 405 and set(r.json()["error"]) == {"message", "type", "param", "code"}


BAD_IMAGES = [
    ("n 0", {"prompt": "a", "n": 0}, "n", "invalid_value"),
    ("n too many", {"prompt": "a", "n": 50}, "n", "invalid_value"),
    ("url format", {"prompt": "a", "response_format": "url"}, "response_format", "invalid_value"),
    ("gif", {"prompt": "a", "output_format": "gif"}, "output_format", "invalid_value"),
    ("compression 101", {"prompt": "a", "output_format": "webp", "output_compression": 101}, "output_compression",
     "invalid_value"),
    ("stream", {"prompt": "a", "stream": True}, "stream", "unsupported_parameter"),
    ("empty prompt", {"prompt": "  "}, "prompt", "invalid_prompt"),
    ("missing prompt", {"n": 1}, "prompt", "missing_required_parameter"),
    ("bad size", {"prompt": "a", "size": "1000x1000"}, "height", "invalid_size"),
    ("size conflict", {"prompt": "a", "size": "512x512", "extra_body": {"size": "256x256"}}, "size",
     "conflicting_values"),
    ("typo", {"prompt": "a", "seeed": 1}, "seeed", "unknown_parameter"),
    ("text modality", {"prompt": "a", "modalities": ["text"]}, "modalities", "unsupported_modality"),
    ("two n names", {"prompt": "a", "n": 2, "num_outputs_per_prompt": 3}, "num_outputs_per_prompt",
     "conflicting_values"),
    ("guidance range", {"prompt": "a", "guidance_scale": -1}, "guidance_scale", "invalid_value"),
]


@pytest.mark.parametrize("body, param, code", [c[1:] for c in BAD_IMAGES], ids=[c[0] for c in BAD_IMAGES])
def test_invalid_images_generation_is_an_openai_400(client, body, param, code):
    assert_openai_error(client.post("/v1/images/generations", json=body), 400, param, code)


BAD_EDITS = [
    ("no image", {"prompt": "a"}, {}, "image", "missing_required_parameter"),
    ("mask", {"prompt": "a"}, {"image": png_bytes(), "mask": png_bytes()}, "mask", "unsupported_parameter"),
    ("not an image", {"prompt": "a"}, {"image": b"GIF89a-broken"}, "image", "invalid_image"),
    ("two images", {"prompt": "a"}, {"image[]": [png_bytes(), png_bytes()]}, "image", "too_many_images"),
    ("steps", {"prompt": "a", "num_inference_steps": "abc"}, {"image": png_bytes()},
     "num_inference_steps", "invalid_type"),
    ("no prompt", {}, {"image": png_bytes()}, "prompt", "missing_required_parameter"),
    ("invalid size", {"prompt": "a", "size": "100x100"}, {"image": png_bytes()}, "height", "invalid_size"),
    ("field twice", {"prompt": "a", "cfg_interval": "[0.1, 1]", "cfg_interval[]": "0.2"},
     {"image": png_bytes()}, "cfg_interval", "conflicting_values"),
    ("seed overflow with n", {"prompt": "a", "n": "2", "seed": str(2**63 - 1)}, {"image": png_bytes()},
     "seed", "invalid_value"),
]


@pytest.mark.parametrize("data, files, param, code", [c[1:] for c in BAD_EDITS], ids=[c[0] for c in BAD_EDITS])
def test_invalid_image_edit_is_an_openai_400(client, data, files, param, code):
    parts = [(k, (f"f{i}.png", b, "image/png")) for k, v in files.items()
             for i, b in enumerate(v if isinstance(v, list) else [v])]
    if parts:
        r = client.post("/v1/images/edits", data=data, files=parts)
    else:   # httpx sends a urlencoded body without files: write the multipart form by hand
        form = b"".join(f'--x\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
                        for k, v in data.items()) + b"--x--\r\n"
        r = client.post("/v1/images/edits", content=form,
                        headers={"content-type": "multipart/form-data; boundary=x"})
    assert_openai_error(r, 400, param, code)
    assert " at 0x" not in r.json()["error"]["message"]   # no repr of a server object (PIL names its BytesIO)


def test_edit_must_be_multipart(client):
    assert_openai_error(client.post("/v1/images/edits", json={"prompt": "a"}), 400, code="invalid_content_type")


NEVER_500 = [b"", b"null", b"[]", b'"text"', b"123", b'{"messages": null}', b'{"messages": [{}]}',
             b'{"messages": [null]}', b'{"messages": [{"role": "user"}]}',
             b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}',
             b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": 5}}]}]}',
             b'{"messages": [{"role": "user", "content": "x"}], "seed": 1e400}',
             b'{"messages": [{"role": "user", "content": "x"}], "cfg_text_scale": NaN, "modalities": ["image"]}',
             b'{"messages": [{"role": "user", "content": "x"}], "seed": 99999999999999999999999}',
             b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
             b'{"messages": [{"role": "user", "content": "x"}], "stream_options": 3}',
             b'{"messages": [{"role": "user", "content": "x"}], "extra_body": {"extra_args": 3}}']


@pytest.mark.parametrize("raw", NEVER_500)
def test_garbage_is_a_4xx_never_a_500(client, raw):
    for route in ("/v1/chat/completions", "/v1/images/generations"):
        r = client.post(route, content=raw, headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500, (route, r.status_code, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


# -- stage exceptions -> client errors ---------------------------------------------------------------

def _remote(cause: Exception):
    """The exception as a caller of a Serve handle sees it."""
    from ray.exceptions import RayTaskError
    return RayTaskError("prefill_context", "remote traceback", cause).as_instanceof_cause()


def test_thinker_context_too_long_maps_to_400():
    from stages.thinker.errors import ContextTooLongError

    err = stage_error(_remote(ContextTooLongError(9000, 8192)), "thinker")
    assert (err.status, err.code, err.param) == (400, "context_length_exceeded", "messages")
    assert "9000" in err.message and "remote traceback" not in err.message


def test_vllm_prompt_too_long_maps_to_400():
    from vllm.exceptions import VLLMValidationError

    cause = VLLMValidationError("The decoder prompt (length 9000) is longer than the maximum model "
                                "length of 8192.")
    err = stage_error(_remote(cause), "thinker")
    assert (err.status, err.code, err.type) == (400, "context_length_exceeded", "invalid_request_error")


def test_stage_exception_with_http_status_keeps_its_4xx():
    from stages.dit.engine import DiTRequestError

    err = stage_error(_remote(DiTRequestError("latent grid too large", param="size", code="invalid_size")),
                      "dit")
    assert (err.status, err.code, err.param, err.message) == (400, "invalid_size", "size",
                                                              "latent grid too large")


def test_unavailable_and_broken_stages_are_5xx_with_the_openai_shape():
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
    from stages.thinker.errors import KVExportError

    assert stage_error(BackPressureError(num_queued_requests=5, max_queued_requests=4), "dit").status == 503
    assert stage_error(DeploymentUnavailableError("DiTStage"), "dit").status == 503
    assert stage_error(_remote(KVExportError("expired")), "thinker").status == 503
    bug = stage_error(_remote(RuntimeError("CUDA error")), "dit")
    assert bug.status == 500 and bug.body()["error"]["type"] == "server_error"
    assert bug.message == "the dit stage failed: RuntimeError: CUDA error"   # no remote traceback
