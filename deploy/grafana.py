"""The Grafana dashboard of lance-serve (k8s/grafana/lance-serve-dashboard.json), rendered from the metric
table in stages/metrics.py, so that it queries exactly the names the code exports.

    python -m deploy.grafana -o k8s/grafana/lance-serve-dashboard.json

Import it in Grafana (Dashboards -> New -> Import) and pick the Prometheus data source that scrapes
the Ray nodes' metrics export ports (KubeRay: port 8080 of every pod; Ray's own guide:
https://docs.ray.io/en/latest/cluster/metrics.html). tests/test_grafana_dashboard.py fails while the
committed file is stale, or when it queries a name the code does not define.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from stages import metrics as m

DASHBOARD_PATH = Path("k8s/grafana/lance-serve-dashboard.json")
RATE = "[$__rate_interval]"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def _q(spec: m.MetricSpec, suffix: str = "") -> str:
    return spec.exported + suffix


def quantiles(spec: m.MetricSpec, by: str, qs=(0.5, 0.95)) -> list[tuple[str, str]]:
    """(PromQL, legend) of the histogram's quantiles per `by` label."""
    return [(f"histogram_quantile({q}, sum by (le, {by}) (rate({_q(spec, '_bucket')}{RATE})))",
             f"p{round(q * 100)} {{{{{by}}}}}") for q in qs]


def rate_by(spec: m.MetricSpec, by: str | None = None, legend: str | None = None) -> tuple[str, str]:
    group = f" by ({by})" if by else ""
    return f"sum{group} (rate({_q(spec)}{RATE}))", legend or (f"{{{{{by}}}}}" if by else spec.name)


def gauge_by(spec: m.MetricSpec, by: str = "replica") -> tuple[str, str]:
    return f"sum by ({by}) ({_q(spec)})", f"{{{{{by}}}}}"


def mean_of(spec: m.MetricSpec, legend: str) -> tuple[str, str]:
    return (f"sum(rate({_q(spec, '_sum')}{RATE})) / sum(rate({_q(spec, '_count')}{RATE}))", legend)


def vllm(name: str, legend: str, kind: str = "raw") -> tuple[str, str]:
    assert name in m.VLLM_EXPORTED, name
    if kind == "rate":
        return f"sum by (model_name) (rate({name}{RATE}))", legend
    if kind == "p95":
        return f"histogram_quantile(0.95, sum by (le, model_name) (rate({name}_bucket{RATE})))", legend
    return f"sum by (ReplicaId) ({name})", legend


def panels() -> list[tuple[str, list[tuple[str, str]] | None, str]]:
    """(title, [(expr, legend)], unit); targets None: a row header."""
    return [
        ("Requests", None, ""),
        ("Requests per second by route and status", [rate_by(m.REQUESTS, "route, status", "{{route}} {{status}}")],
         "reqps"),
        ("Requests per second by task", [rate_by(m.REQUESTS, "task")], "reqps"),
        ("End-to-end latency by task", quantiles(m.REQUEST_DURATION, "task"), "s"),
        ("Stage calls in flight", [gauge_by(m.STAGE_IN_FLIGHT, "stage")], "short"),
        ("Stage call time (ingress view, queueing included)", quantiles(m.STAGE_CALL_DURATION, "stage"), "s"),
        ("Retries per second by stage", [rate_by(m.RETRIES, "stage")], "short"),
        ("Refused media fetches per second by reason", [rate_by(m.FETCHES_REFUSED, "reason")], "short"),
        ("Thinker", None, ""),
        ("Prefill time by task", quantiles(m.PREFILL_DURATION, "task"), "s"),
        ("KV hand-off time by phase", quantiles(m.KV_HANDOFF_DURATION, "phase"), "s"),
        ("KV bytes handed off per second", [rate_by(m.KV_BYTES, "task")], "Bps"),
        ("KV export registry size", [gauge_by(m.EXPORT_REGISTRY_SIZE)], "short"),
        ("vLLM requests running / waiting", [vllm("ray_vllm_num_requests_running", "running {{ReplicaId}}"),
                                             vllm("ray_vllm_num_requests_waiting", "waiting {{ReplicaId}}")],
         "short"),
        ("vLLM KV cache usage", [vllm("ray_vllm_kv_cache_usage_perc", "{{ReplicaId}}")], "percentunit"),
        ("vLLM tokens per second", [vllm("ray_vllm_prompt_tokens_total", "prompt", "rate"),
                                    vllm("ray_vllm_generation_tokens_total", "generated", "rate")], "short"),
        ("vLLM time to first token / request latency (p95)",
         [vllm("ray_vllm_time_to_first_token_seconds", "time to first token", "p95"),
          vllm("ray_vllm_e2e_request_latency_seconds", "request", "p95")], "s"),
        ("DiT", None, ""),
        ("DiT queue depth and active batch", [(f"sum by (replica) ({_q(m.DIT_QUEUE_DEPTH)})", "queued {{replica}}"),
                                              (f"sum by (replica) ({_q(m.DIT_ACTIVE_BATCH)})", "active {{replica}}")],
         "short"),
        ("DiT engine steps per second", [rate_by(m.DIT_STEPS, "replica")], "short"),
        ("DiT mean batch per step", [mean_of(m.DIT_STEP_BATCH, "jobs per step")], "short"),
        ("Denoise time by task", quantiles(m.DENOISE_DURATION, "task"), "s"),
        ("VAE decode time by task", quantiles(m.DECODE_DURATION, "task"), "s"),
        ("Encode time by task", quantiles(m.ENCODE_DURATION, "task"), "s"),
    ]


def render() -> dict:
    out, y, x, panel_id = [], 0, 0, 1
    for title, targets, unit in panels():
        if targets is None:
            y += 8 if x else 0
            x = 0
            out.append({"id": panel_id, "type": "row", "title": title, "collapsed": False,
                        "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
            y += 1
        else:
            out.append({
                "id": panel_id, "type": "timeseries", "title": title, "datasource": DATASOURCE,
                "gridPos": {"h": 8, "w": 8, "x": x, "y": y},
                "fieldConfig": {"defaults": {"unit": unit, "min": 0}, "overrides": []},
                "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                            "tooltip": {"mode": "multi", "sort": "none"}},
                "targets": [{"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr,
                             "legendFormat": legend} for i, (expr, legend) in enumerate(targets)]})
            x += 8
            if x == 24:
                x, y = 0, y + 8
        panel_id += 1
    return {
        "title": "lance-serve", "uid": "lance-serve", "tags": ["lance-serve", "ray", "vllm"],
        "description": "lance-serve's requests, thinker (vLLM) and DiT stages; rendered by deploy/grafana.py "
                       "from stages/metrics.py",
        "editable": True, "schemaVersion": 39, "version": 1, "refresh": "30s", "timezone": "browser",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [{"name": "datasource", "label": "Prometheus", "type": "datasource",
                                 "query": "prometheus", "current": {}, "hide": 0}]},
        "annotations": {"list": []},
        "panels": out,
    }


def render_text() -> str:
    return json.dumps(render(), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output", default=str(DASHBOARD_PATH), help="where to write it ('-': stdout)")
    args = parser.parse_args(argv)
    text = render_text()
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
