"""The metrics endpoint of a real server, after a few real requests (issue 13: "metrics you can trust").

On the session's shared `serve run` (tests/serve_server.py), the test sends t2i, an image edit, image
understanding, a chat and two requests that fail on purpose (a remote image URL while remote media is
off, an unknown video id), then scrapes Prometheus's own way: the targets Ray lists in the session's
`prom_metrics_service_discovery.json` (every node's metrics export port), over HTTP. Ray exports
every ~10 s, so the checks are polled with a deadline. Every metric of stages/metrics.py and the vLLM
names the dashboard charts must be there, with values the requests explain: counters up by at least
what was sent, histograms with observations and positive sums, bytes > 0, and labels from bounded
sets (route templates, never raw paths).
"""
from __future__ import annotations

import json
import re
import time
from collections import defaultdict

import httpx
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from helpers import data_url, png_bytes
from serve_server import Server
from stages import metrics as m

pytestmark = pytest.mark.heavy   # `serve run` of the whole app (shared with test_serve_e2e.py)

SCRAPE_DEADLINE_S = 120
SMALL = {"size": "64x64", "num_inference_steps": 4}
UNKNOWN_VIDEO = "video_metrics_test_does_not_exist"

Samples = dict[str, list[tuple[dict, float]]]


def prometheus_targets(server: Server) -> list[str]:
    """host:port of every metrics endpoint of the server's cluster, as Prometheus would find them."""
    path = server.ray_tmp / "ray" / "session_latest" / "prom_metrics_service_discovery.json"
    deadline = time.monotonic() + 60
    while not path.is_file():
        assert time.monotonic() < deadline, f"Ray wrote no {path.name}"
        time.sleep(1)
    targets = [t for group in json.loads(path.read_text()) for t in group["targets"]]
    assert targets, path.read_text()
    return targets


def scrape(targets: list[str]) -> Samples:
    samples: Samples = defaultdict(list)
    for target in targets:
        try:
            text = httpx.get(f"http://{target}/metrics", timeout=30).text
        except httpx.HTTPError:
            continue   # e.g. the dashboard's address while it restarts: the nodes' ports matter
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                samples[s.name].append((s.labels, s.value))
    return samples


def total(samples: Samples, name: str, **labels) -> float:
    return sum(v for lab, v in samples.get(name, ()) if all(lab.get(k) == w for k, w in labels.items()))


def exists(samples: Samples, name: str, **labels) -> bool:
    return any(all(lab.get(k) == w for k, w in labels.items()) for lab, _ in samples.get(name, ()))


def image_message(image: Image.Image, text: str) -> list:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png_bytes(image))}},
                                         {"type": "text", "text": text}]}]


def send_requests(http: httpx.Client) -> None:
    """One of each: t2i, edit, image understanding, chat; and two that fail on purpose."""
    image = Image.new("RGB", (96, 80), (200, 40, 40))
    resp = http.post("/v1/images/generations", json={"prompt": "a red cube", **SMALL, "seed": 1})
    assert resp.status_code == 200, resp.text[:300]
    resp = http.post("/v1/chat/completions", json={
        "messages": image_message(image, "Make it green"), "modalities": ["image"],
        "resolution": "image_256res", "num_inference_steps": 2, "seed": 2})
    assert resp.status_code == 200, resp.text[:300]
    resp = http.post("/v1/chat/completions", json={
        "messages": image_message(image, "What color is it?"), "modalities": ["text"], "max_tokens": 4,
        "resolution": "image_256res"})
    assert resp.status_code == 200, resp.text[:300]
    resp = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hello"}],
                                                   "max_tokens": 4})
    assert resp.status_code == 200, resp.text[:300]
    resp = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://images.example/cube.png"}},
        {"type": "text", "text": "What is this?"}]}]})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "remote_images_disabled", resp.text[:300]
    resp = http.get(f"/v1/videos/{UNKNOWN_VIDEO}")
    assert resp.status_code in (404, 503), resp.text[:300]


def problems(before: Samples, after: Samples, app_routes: set[str]) -> list[str]:
    """What the scrape `after` (the requests sent since `before`) does not show yet."""
    out = []

    def grew(name: str, by: float, **labels) -> None:
        have, had = total(after, name, **labels), total(before, name, **labels)
        if have < had + by:
            out.append(f"{name}{labels}: {had} -> {have}, expected +{by}")

    def present(name: str, **labels) -> None:
        if not exists(after, name, **labels):
            out.append(f"{name}{labels} is not exported")

    def observed(spec: m.MetricSpec, by: int = 1, **labels) -> None:
        grew(spec.exported + "_count", by, **labels)
        if total(after, spec.exported + "_sum", **labels) <= 0:
            out.append(f"{spec.exported}_sum{labels} is not positive")

    # every defined metric is exported under its name
    for spec in m.ALL:
        present(spec.exported + ("_count" if spec.kind == "histogram" else ""))
    for name in m.VLLM_EXPORTED:
        present(name if not name.endswith("_seconds") else name + "_count")

    # ingress: requests by route template, task and status, end to end
    grew(m.REQUESTS.exported, 1, route="/v1/images/generations", task="t2i", status="200")
    for task in ("image_edit", "x2t_image", "chat"):
        grew(m.REQUESTS.exported, 1, route="/v1/chat/completions", task=task, status="200")
    grew(m.REQUESTS.exported, 1, route="/v1/chat/completions", task="none", status="400")
    present(m.REQUESTS.exported, route="/v1/videos/{video_id}")
    observed(m.REQUEST_DURATION, 4, route="/v1/chat/completions")
    observed(m.REQUEST_DURATION, 1, route="/v1/images/generations", task="t2i")
    labels = [lab for lab, _ in after.get(m.REQUESTS.exported, ())]
    routes = {lab.get("route") for lab in labels}
    if not routes <= app_routes | {"unmatched"}:
        out.append(f"route labels that are not route templates: {sorted(routes - app_routes)}")
    odd = {(lab.get("task"), lab.get("status")) for lab in labels
           if lab.get("task") not in (*m.TASKS, "none") or not re.fullmatch(r"[1-5]\d\d", lab.get("status", ""))}
    if odd:
        out.append(f"task/status labels outside their sets: {sorted(odd)}")
    observed(m.STAGE_CALL_DURATION, 4, stage="thinker")
    observed(m.STAGE_CALL_DURATION, 2, stage="dit")
    for stage in ("thinker", "dit"):
        present(m.STAGE_IN_FLIGHT.exported, stage=stage)
        present(m.RETRIES.exported, stage=stage)
    grew(m.FETCHES_REFUSED.exported, 1, reason="disabled")

    # thinker
    for task in ("t2i", "image_edit", "x2t_image", "chat"):
        observed(m.PREFILL_DURATION, 1, task=task)
    observed(m.KV_HANDOFF_DURATION, 2, phase="export")
    observed(m.KV_HANDOFF_DURATION, 2, phase="fetch")
    for task in ("t2i", "image_edit"):
        grew(m.KV_BYTES.exported, 1, task=task)
    registry = [v for _, v in after.get(m.EXPORT_REGISTRY_SIZE.exported, ())]
    if registry and not all(0 <= v < 100 for v in registry):
        out.append(f"{m.EXPORT_REGISTRY_SIZE.exported} = {registry}")

    # DiT: 4 + 2 denoising steps at least, each step advancing >= 1 job
    grew(m.DIT_STEPS.exported, 6)
    observed(m.DIT_STEP_BATCH, 6)
    if total(after, m.DIT_STEP_BATCH.exported + "_sum") < total(after, m.DIT_STEP_BATCH.exported + "_count"):
        out.append("a DiT step advanced fewer than one job on average")
    for spec in (m.DIT_QUEUE_DEPTH, m.DIT_ACTIVE_BATCH):
        if any(v < 0 for _, v in after.get(spec.exported, ())):
            out.append(f"{spec.exported} is negative")
    for spec in (m.DENOISE_DURATION, m.DECODE_DURATION, m.ENCODE_DURATION):
        for task in ("t2i", "image_edit"):
            observed(spec, 1, task=task)

    # vLLM's own engine metrics, from the thinker's AsyncLLM
    grew("ray_vllm_prompt_tokens_total", 4)
    grew("ray_vllm_generation_tokens_total", 2)
    grew("ray_vllm_e2e_request_latency_seconds_count", 4)
    return out


def test_the_metrics_endpoint_shows_every_metric_after_a_few_requests(server, http):
    from serve_app.ingress import IngressSettings, LanceService, build_fastapi_app

    app = build_fastapi_app(LanceService(IngressSettings(served_model_name="m", model_path="/m")))
    app_routes = {r.path for r in app.routes}
    targets = prometheus_targets(server)
    before = scrape(targets)
    send_requests(http)
    deadline = time.monotonic() + SCRAPE_DEADLINE_S
    while True:
        after = scrape(targets)
        missing = problems(before, after, app_routes)
        if not missing:
            break
        if time.monotonic() > deadline:
            pytest.fail(f"after {SCRAPE_DEADLINE_S}s the metrics of {targets} still lack:\n" + "\n".join(missing))
        time.sleep(3)
    # no raw path and no request id ever becomes a label
    text = "".join(httpx.get(f"http://{t}/metrics", timeout=30).text for t in targets)
    assert UNKNOWN_VIDEO not in text
