"""Fuzz lance-serve's /openapi.json with schemathesis against a real server (issue 13, item 8).

    python benchmarks/fuzz_openapi.py --start-server          # serve run configs/lance_2stage.yaml
                                                              # (CPU: the tiny checkpoint), fuzz, stop
    python benchmarks/fuzz_openapi.py --url http://127.0.0.1:8000   # a server that already runs

It runs `schemathesis run` on the server's own schema: positive and negative cases (`--mode all`),
the examples, coverage and fuzzing phases (and stateful with --phases), `--max-examples` per
operation (default 50), with the checks `not_a_server_error` and `response_schema_conformance`
plus the other response checks of schemathesis (`--checks`), and writes what was sent and answered
per operation to a JSON file (`--out`): counts by generation mode, phase and status.

This module is also the schemathesis hook module of the run (SCHEMATHESIS_HOOKS=fuzz_openapi):

* The server's limits stay what they are. Requests the server accepts are made cheap on the client
  side: a knob the server would accept with a costly value (height, width or size up to 1024,
  num_inference_steps up to 200, num_frames up to 121, n up to 4, max_tokens up to the context,
  the resolution presets) is replaced by a cheap valid one, and a request that gives no size, steps
  or frame count gets cheap ones (on the tiny CPU checkpoint a default 121-frame 848x480 video takes
  hours). A value the server refuses is left as generated, so every out-of-range value still
  reaches the server's checks. Cases stay positive or negative as generated (schemathesis
  re-classifies a case its hook changed).
* A created video job is waited for (GET until completed or failed, bounded), as a client would,
  so that background jobs do not pile up on the stages and turn later requests into 503s.
* Every answer is counted (operation, mode, phase, status) into $FUZZ_OPENAPI_COUNTS at exit, and
  the ids of the videos it created are listed there, so the caller can delete them.
"""
from __future__ import annotations

import argparse
import atexit
import collections
import datetime
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
COUNTS_ENV = "FUZZ_OPENAPI_COUNTS"
CHECKS = ("not_a_server_error,response_schema_conformance,status_code_conformance,"
          "content_type_conformance,response_headers_conformance,negative_data_rejection,"
          "unsupported_method,allow_header_conformance,missing_required_header")

# -- making accepted requests cheap ---------------------------------------------------------------
MAX_SIDE, MIN_SIDE, SIDE_MULTIPLE = 1024, 64, 16
CHEAP_SIDE, CHEAP_STEPS, CHEAP_FRAMES, CHEAP_N, CHEAP_TOKENS = 64, 2, 5, 2, 16
GENERATING = ("/v1/chat/completions", "/v1/images/generations", "/v1/images/edits", "/v1/videos",
              "/v1/videos/{video_id}/remix")
_SIZE = re.compile(r"\s*0*(\d+)\s*[xX]\s*0*(\d+)\s*")
_NESTED = re.compile(r"extra_(?:body|args)\[([^\[\]]+)\]")


def _number(value, kind=int):
    """The value as a number if it is one (JSON) or spells one (a form field); else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)) and kind is float or isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return kind(value)
        except ValueError:
            return None
    return None


def _same_type(original, value):
    return str(value) if isinstance(original, str) else value


def _valid_side(v) -> bool:
    return v is not None and MIN_SIDE <= v <= MAX_SIDE and v % SIDE_MULTIPLE == 0


def _cheap_value(name: str, value):
    """A cheap valid value in place of a valid costly one; anything else unchanged."""
    n = _number(value)
    if name in ("height", "width") and _valid_side(n):
        return _same_type(value, CHEAP_SIDE)
    if name == "size" and isinstance(value, str):
        m = _SIZE.fullmatch(value)
        if m and all(_valid_side(int(s)) for s in m.groups()):
            return f"{CHEAP_SIDE}x{CHEAP_SIDE}"
    if name == "num_inference_steps" and n is not None and 1 <= n <= 200:
        return _same_type(value, min(n, CHEAP_STEPS))
    if name == "num_frames" and n is not None and 1 <= n <= 121 and (n - 1) % 4 == 0:
        return _same_type(value, min(n, CHEAP_FRAMES))
    if name in ("n", "num_outputs_per_prompt") and n is not None and 1 <= n <= 4:
        return _same_type(value, min(n, CHEAP_N))
    if name in ("max_tokens", "max_completion_tokens") and n is not None and 1 <= n <= 4096:
        return _same_type(value, min(n, CHEAP_TOKENS))
    if name == "resolution" and isinstance(value, str):
        return {"image_768res": "image_256res", "image_512res": "image_256res",
                "video_480p": "video_192p", "video_360p": "video_192p"}.get(value, value)
    if name == "seconds" and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        try:
            from fractions import Fraction
            s = Fraction(str(value).strip())
        except (ValueError, ZeroDivisionError):
            return value
        frames = 12 * s + 1
        if frames.denominator == 1 and 1 <= frames <= 121 and (int(frames) - 1) % 4 == 0:
            return _same_type(value, 0) if not isinstance(value, float) else 0.0
    return value


def _containers(body: dict) -> list[dict]:
    out = [body]
    for key in ("extra_body", "extra_args"):
        if isinstance(body.get(key), dict):
            out.append(body[key])
    nested = body.get("extra_body")
    if isinstance(nested, dict) and isinstance(nested.get("extra_args"), dict):
        out.append(nested["extra_args"])
    return out


def _given(containers: list[dict], *names: str) -> bool:
    for c in containers:
        for key in c:
            m = _NESTED.fullmatch(key) if isinstance(key, str) else None
            if key in names or (m and m.group(1) in names):
                return True
    return False


def cheapen(path: str, body, form: bool, positive: bool = True) -> None:
    """Make an accepted request cheap, in place (see the module docstring). A negative case only
    gets the knobs it lacks: its values stay as generated (one of them is the invalid one)."""
    if not isinstance(body, dict):
        return
    containers = _containers(body)
    for c in containers if positive else ():
        for key in list(c):
            if not isinstance(key, str):
                continue
            m = _NESTED.fullmatch(key)
            c[key] = _cheap_value(m.group(1) if m else key, c[key])
    def add(name, value):   # typed as the schema says, also in a form (schemathesis serializes
        if not _given(containers, name):   # it; text would read as a type violation to its
            body[name] = value             # re-validation and relabel the case negative)

    modalities = next((c.get("modalities") for c in containers if "modalities" in c), None)
    video = path.startswith("/v1/videos") or modalities == ["video"]
    if not _given(containers, "size", "height", "width"):
        add("size", f"{CHEAP_SIDE}x{CHEAP_SIDE}")
    add("num_inference_steps", CHEAP_STEPS)
    add("resolution", "video_192p" if video else "image_256res")
    if video and not _given(containers, "num_frames", "seconds"):
        add("num_frames", CHEAP_FRAMES)
    if path == "/v1/chat/completions" and not _given(containers, "max_tokens",
                                                     "max_completion_tokens"):
        add("max_tokens", CHEAP_TOKENS)


def _has_binary(body) -> bool:
    """Does the body carry an uploaded file (schemathesis' own test where it has one)?"""
    try:
        from schemathesis.transport.serialization import contains_binary
    except ImportError:
        return isinstance(body, dict) and any(isinstance(v, (bytes, bytearray)) for v in body.values())
    return contains_binary(body)


# -- schemathesis hooks -----------------------------------------------------------------------------
_counts: dict = collections.defaultdict(lambda: collections.Counter())
_videos: list[str] = []
_slowest: dict[str, float] = {}
_started: dict[int, float] = {}
_reasons: dict = collections.defaultdict(lambda: collections.Counter())


def _dump() -> None:
    path = os.environ.get(COUNTS_ENV)
    if not path:
        return
    out = {"operations": {}, "videos_created": _videos, "slowest_s": _slowest,
           "top_4xx_reasons": {op: dict(c.most_common(8)) for op, c in _reasons.items()}}
    for (label, mode, phase), statuses in sorted(_counts.items()):
        op = out["operations"].setdefault(label, {"total": 0, "by_mode": {}, "by_phase": {},
                                                  "by_status": {}})
        n = sum(statuses.values())
        op["total"] += n
        op["by_mode"][mode] = op["by_mode"].get(mode, 0) + n
        op["by_phase"][phase] = op["by_phase"].get(phase, 0) + n
        for status, k in statuses.items():
            op["by_status"][str(status)] = op["by_status"].get(str(status), 0) + k
    Path(path).write_text(json.dumps(out, indent=1, sort_keys=True))


try:
    import schemathesis

    @schemathesis.hook
    def before_call(context, case, kwargs):
        if case.operation.path in GENERATING and case.method.upper() == "POST":
            meta = getattr(case, "_meta", None)
            mode = getattr(getattr(getattr(meta, "generation", None), "mode", None), "value", "")
            cheapen(case.operation.path, case.body,
                    form=(case.media_type or "").startswith("multipart/"),
                    positive=mode != "negative")
            if _has_binary(case.body) and hasattr(case, "_sync_validated_hashes"):
                # schemathesis re-validates a body a hook edited, and (4.32: Case._validate_component,
                # `contains_binary(value)` -> invalid) counts any body with an uploaded file as invalid
                # without looking: every edited upload case became "negative", and a valid edit answered
                # 200 was reported as accepted negative data (runs 1-3). The knobs added here are valid
                # (or, in a negative case, only missing ones), so the generation-time mode stands.
                case._sync_validated_hashes()
        _started[id(case)] = time.monotonic()

    @schemathesis.hook
    def after_call(context, case, response):
        label = f"{case.operation.method.upper()} {case.operation.path}"   # not a mutated method
        meta = getattr(case, "_meta", None)
        mode = getattr(getattr(getattr(meta, "generation", None), "mode", None), "value", "?")
        phase = getattr(getattr(getattr(meta, "phase", None), "name", None), "value", "?")
        _counts[(label, mode, phase)][response.status_code] += 1
        if sum(sum(c.values()) for c in _counts.values()) % 200 == 0:
            _dump()   # so that a run cut short still leaves its counts
        if 400 <= response.status_code < 500:
            try:
                error = response.json()["error"]
                _reasons[label][f"{response.status_code} {error.get('code')} "
                                f"({error.get('param')})"] += 1
            except Exception:
                _reasons[label][f"{response.status_code} (no OpenAI error body)"] += 1
        took = time.monotonic() - _started.pop(id(case), time.monotonic())
        _slowest[label] = round(max(_slowest.get(label, 0.0), took), 2)
        if label in ("POST /v1/videos", "POST /v1/videos/{video_id}/remix") \
                and response.status_code == 200:
            _wait_for_video(case, response)

    atexit.register(_dump)
except ImportError:   # the script itself runs without schemathesis installed in its interpreter
    pass


def _wait_for_video(case, response, timeout_s: float = 120.0) -> None:
    import requests
    try:
        video_id = response.json()["id"]
    except Exception:
        return
    _videos.append(video_id)
    base = response.request.url.split("/v1/videos")[0]
    headers = {k: v for k, v in response.request.headers.items() if k.lower() == "authorization"}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        r = requests.get(f"{base}/v1/videos/{video_id}", headers=headers, timeout=30)
        if r.status_code != 200 or r.json().get("status") in ("completed", "failed"):
            return
        time.sleep(0.5)


# -- running it -------------------------------------------------------------------------------------

def schemathesis_command(url: str, max_examples: int, phases: str, seed: int | None,
                         checks: str = CHECKS, workers: int = 1) -> list[str]:
    exe = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or "schemathesis"
    cmd = [exe, "run", f"{url}/openapi.json", "--mode", "all", "--checks", checks,
           "--max-examples", str(max_examples), "--phases", phases, "--workers", str(workers),
           "--request-timeout", "300", "--suppress-health-check", "all", "--no-color",
           "--continue-on-failure"]   # every operation gets all its cases, whatever one found
    if seed is not None:
        cmd += ["--seed", str(seed)]
    return cmd


def run_fuzz(url: str, max_examples: int, phases: str, seed: int | None, log_path: Path,
             checks: str = CHECKS, timeout_s: float | None = None) -> dict:
    """Run schemathesis on `url` with this module's hooks; its exit code, output and counts."""
    with tempfile.TemporaryDirectory() as tmp:
        counts_path = Path(tmp) / "counts.json"
        env = dict(os.environ, SCHEMATHESIS_HOOKS="fuzz_openapi", **{COUNTS_ENV: str(counts_path)},
                   PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).parent),
                                                            os.environ.get("PYTHONPATH")])))
        cmd = schemathesis_command(url, max_examples, phases, seed, checks)
        start = time.monotonic()
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:   # Ctrl-C: schemathesis reports what it ran so far
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(120)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        counts = json.loads(counts_path.read_text()) if counts_path.is_file() else {}
    output = log_path.read_text(errors="replace")
    return {"command": " ".join(cmd[1:]), "exit_code": proc.returncode,
            "seconds": round(time.monotonic() - start, 1), "counts": counts,
            "summary": _summary_lines(output)}


def merged(runs: list[dict]) -> dict:
    """One result of several schemathesis runs: counts added up, the worst exit code."""
    counts: dict = {"operations": {}, "top_4xx_reasons": {}, "videos_created": []}
    for run in runs:
        c = run["counts"]
        counts["videos_created"] += c.get("videos_created", [])
        for op, o in c.get("operations", {}).items():
            into = counts["operations"].setdefault(op, {"total": 0, "by_mode": {}, "by_phase": {},
                                                        "by_status": {}})
            into["total"] += o["total"]
            for key in ("by_mode", "by_phase", "by_status"):
                for k, n in o[key].items():
                    into[key][k] = into[key].get(k, 0) + n
        for op, reasons in c.get("top_4xx_reasons", {}).items():
            into = counts["top_4xx_reasons"].setdefault(op, {})
            for k, n in reasons.items():
                into[k] = into.get(k, 0) + n
    return {"runs": [{k: v for k, v in r.items() if k != "counts"} for r in runs],
            "exit_code": max((r["exit_code"] for r in runs), default=1),
            "seconds": round(sum(r["seconds"] for r in runs), 1), "counts": counts,
            "summary": [line for r in runs for line in r["summary"]]}


def _summary_lines(output: str) -> list[str]:
    tail = output[output.rfind("SUMMARY"):] if "SUMMARY" in output else output[-3000:]
    return [line.rstrip() for line in tail.splitlines() if line.strip()][:60]


def server_errors(counts: dict) -> dict[str, int]:
    """Operation -> number of 5xx answers."""
    return {op: sum(n for s, n in c["by_status"].items() if s.startswith("5"))
            for op, c in counts.get("operations", {}).items()
            if any(s.startswith("5") for s in c["by_status"])}


def delete_videos(url: str, ids: list[str], headers: dict | None = None) -> None:
    import httpx
    for video_id in ids:
        try:
            httpx.delete(f"{url}/v1/videos/{video_id}", headers=headers or {}, timeout=30)
        except httpx.HTTPError:
            pass


def start_server(port: int = 8000) -> tuple[subprocess.Popen, Path]:
    """`serve run configs/lance_2stage.yaml` as tests/serve_server.py starts it (a fresh local Ray
    cluster, HOME a temp dir: the tiny checkpoint on a CPU machine); waits for /health."""
    import httpx
    home = Path(tempfile.mkdtemp(prefix="fuzz-home-"))
    env = {k: v for k, v in os.environ.items()
           if k not in ("LANCE_MODEL", "LANCE_SERVE_CACHE_DIR", "XDG_CACHE_HOME", "RAY_ADDRESS")}
    env.update(HOME=str(home), RAY_TMPDIR=tempfile.mkdtemp(prefix="lsf", dir="/tmp"),
               RAY_ADDRESS="local", RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION="0.05",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    log_path = home / "serve_run.log"
    proc = subprocess.Popen(["serve", "run", "configs/lance_2stage.yaml"], cwd=REPO_ROOT, env=env,
                            stdout=open(log_path, "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"serve run exited:\n{log_path.read_text()[-4000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=15).status_code == 200:
                return proc, log_path
        except httpx.HTTPError:
            pass
        time.sleep(2)
    stop_server(proc)
    raise SystemExit("the server did not become healthy in 900 s")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)   # what is left of its local Ray cluster
    except ProcessLookupError:
        pass
    import socket
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:   # the port is free for the next server
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", 8000)) != 0:
                return
        time.sleep(1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--start-server", action="store_true",
                    help="start `serve run configs/lance_2stage.yaml` first (port 8000) and stop it")
    ap.add_argument("--max-examples", type=int, default=50)
    ap.add_argument("--phases", default="examples,fuzzing;coverage",
                    help="schemathesis phases; ';' separates runs made one after another (the "
                         "fuzzing phase first: coverage sends thousands of cases per operation)")
    ap.add_argument("--checks", default=CHECKS)
    ap.add_argument("--seed", type=int, default=20261206)
    ap.add_argument("--timeout", type=float, default=None,
                    help="stop schemathesis (Ctrl-C) after this many seconds; its counts so far "
                         "are kept")
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" /
                    f"fuzz_openapi_{datetime.date.today():%Y%m%d}.json")
    args = ap.parse_args()
    proc = None
    if args.start_server:
        proc, _ = start_server()
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        log_path = args.out.with_suffix(".log")
        runs, deadline = [], time.monotonic() + (args.timeout or float("inf"))
        for i, phases in enumerate(args.phases.split(";")):
            left = deadline - time.monotonic()
            if left <= 60:
                break
            runs.append(run_fuzz(args.url.rstrip("/"), args.max_examples, phases, args.seed,
                                 log_path.with_suffix(f".{i}.log"), args.checks,
                                 None if left == float("inf") else left))
            delete_videos(args.url.rstrip("/"), runs[-1]["counts"].get("videos_created", []))
        result = merged(runs)
    finally:
        if proc is not None:
            stop_server(proc)
    result.update(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  machine=f"{platform.node()} ({os.cpu_count()} CPUs, {platform.machine()})",
                  server_errors=server_errors(result["counts"]))
    args.out.write_text(json.dumps(result, indent=1))
    print(f"{'operation':45} {'cases':>6} {'positive':>8} {'negative':>8}  statuses")
    for op, c in sorted(result["counts"].get("operations", {}).items()):
        print(f"{op:45} {c['total']:6} {c['by_mode'].get('positive', 0):8} "
              f"{c['by_mode'].get('negative', 0):8}  {c['by_status']}")
    print("\n".join(result["summary"][-12:]))
    print(f"5xx: {result['server_errors'] or 'none'}; schemathesis exit code "
          f"{result['exit_code']}; {result['seconds']} s; logs {log_path.with_suffix('.*.log')}; "
          f"results {args.out}")
    return 0 if result["exit_code"] == 0 and not result["server_errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
