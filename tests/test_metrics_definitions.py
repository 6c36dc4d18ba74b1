"""The metric table (stages/metrics.py), the Grafana dashboard rendered from it
(k8s/grafana/lance-serve-dashboard.json) and the ingress's route labels, without a server.
tests/test_serve_metrics.py checks the same names on a running server's Prometheus endpoint."""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from deploy import grafana
from stages import metrics as m

REPO_ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = REPO_ROOT / grafana.DASHBOARD_PATH
QUERIED_NAME = re.compile(r"\b(ray_[a-z0-9_]+)")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def dashboard_exprs() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p.get("targets", ())]


def queried_names() -> set[str]:
    return {name for expr in dashboard_exprs() for name in QUERIED_NAME.findall(expr)}


def defined_name(queried: str) -> str | None:
    """The exported name a queried series belongs to (a histogram's _bucket/_sum/_count), if defined."""
    by_name = {spec.exported: spec for spec in m.ALL}
    if queried in by_name or queried in m.VLLM_EXPORTED:
        return queried
    for suffix in HISTOGRAM_SUFFIXES:
        base = queried.removesuffix(suffix)
        if base != queried and (base in m.VLLM_EXPORTED or by_name.get(base, None) is not None
                                and by_name[base].kind == "histogram"):
            return base
    return None


def test_the_committed_dashboard_is_the_rendered_one():
    if DASHBOARD.read_text() != grafana.render_text():
        pytest.fail(f"{grafana.DASHBOARD_PATH} is stale; re-render it:\n"
                    f"  .venv/bin/python -m deploy.grafana -o {grafana.DASHBOARD_PATH}")


def test_every_name_the_dashboard_queries_is_defined_in_the_code():
    undefined = sorted(n for n in queried_names() if defined_name(n) is None)
    assert undefined == [], f"the dashboard queries names no code exports: {undefined}"


def test_every_lance_metric_is_on_the_dashboard():
    charted = {defined_name(n) for n in queried_names()}
    missing = sorted(spec.exported for spec in m.ALL if spec.exported not in charted)
    assert missing == [], f"metrics defined but not charted: {missing}"
    assert set(m.VLLM_EXPORTED) <= charted


def test_the_metric_table_is_well_formed():
    names = [spec.name for spec in m.ALL]
    assert len(names) == len(set(names)) and len(names) >= 17
    for spec in m.ALL:
        assert re.fullmatch(r"lance_[a-z0-9_]+", spec.name), spec.name
        assert spec.kind in ("counter", "gauge", "histogram")
        assert (spec.kind == "counter") == spec.name.endswith("_total"), spec.name
        assert (spec.kind == "histogram") == bool(spec.buckets), spec.name
        assert list(spec.buckets) == sorted(spec.buckets)
        assert spec.description
        # unbounded labels (ids, paths, prompts) are never tags
        assert not {"request_id", "path", "url", "prompt", "model"} & set(spec.tag_keys), spec.name
    assert m.task_label("t2i") == "t2i" and m.task_label("x" * 50) == "other"


def test_the_vllm_names_are_vllms_own():
    """vLLM's `vllm:x` is exported by its RayPrometheusStatLogger as `ray_vllm_x` (counters `_total`)."""
    origin = Path(importlib.util.find_spec("vllm").origin).parent / "v1" / "metrics" / "loggers.py"
    source = origin.read_text()
    defined = set(re.findall(r'name="vllm:([a-z0-9_]+)"', source))
    for exported in m.VLLM_EXPORTED:
        base = exported.removeprefix("ray_vllm_")
        assert base in defined or base.removesuffix("_total") in defined, exported


def test_routes_are_labelled_by_their_template():
    from serve_app.ingress import IngressSettings, LanceService, build_fastapi_app
    from serve_app.metrics import RequestMetricsMiddleware, UNMATCHED_ROUTE

    app = build_fastapi_app(LanceService(IngressSettings(served_model_name="m", model_path="/m")))
    middleware = RequestMetricsMiddleware(app=None, router=app.router)

    def label(method: str, path: str) -> str:
        return middleware.route_label({"type": "http", "method": method, "path": path, "root_path": "",
                                       "headers": [], "query_string": b""})

    assert label("GET", "/v1/videos/video_0123abcd") == "/v1/videos/{video_id}"
    assert label("GET", "/v1/videos/video_0123abcd/content") == "/v1/videos/{video_id}/content"
    assert label("POST", "/v1/chat/completions") == "/v1/chat/completions"
    assert label("GET", "/playground/app.js") == "/playground/{name}"
    assert label("GET", "/health") == "/health"
    # a wrong method is still the route's template; an unknown path is one label, not its path
    assert label("GET", "/v1/chat/completions") == "/v1/chat/completions"
    assert label("GET", "/wp-admin/../../etc/passwd") == UNMATCHED_ROUTE
