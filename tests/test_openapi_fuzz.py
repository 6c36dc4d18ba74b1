"""A short schemathesis pass over the real server's /openapi.json (issue 13, item 8): positive and
negative cases of every operation, with `not_a_server_error` and `response_schema_conformance`.

The session's shared `serve run` (tests/serve_server.py); the hooks and the runner are
benchmarks/fuzz_openapi.py's (accepted requests are made cheap on the client side, a created video
is waited for), the long run with its documented result is that script (benchmarks/README.md).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.heavy

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "fuzz_openapi.py"
OPERATIONS = 11


def _fuzz_module():
    spec = importlib.util.spec_from_file_location("fuzz_openapi", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_short_schemathesis_pass_finds_no_server_error_and_no_schema_mismatch(server, tmp_path):
    fuzz = _fuzz_module()
    log_path = tmp_path / "schemathesis.log"
    result = fuzz.run_fuzz(server.base_url, max_examples=15, phases="examples,fuzzing",
                           seed=13, log_path=log_path,
                           checks="not_a_server_error,response_schema_conformance",
                           timeout_s=900)
    counts = result["counts"]
    fuzz.delete_videos(server.base_url, counts.get("videos_created", []))
    output = log_path.read_text(errors="replace")
    assert result["exit_code"] == 0, output[-8000:]
    assert fuzz.server_errors(counts) == {}, output[-8000:]
    ops = counts["operations"]
    assert len(ops) == OPERATIONS, sorted(ops)
    for label, op in ops.items():
        if label.startswith("POST"):   # operations with a body: both kinds of case, 15 of them
            assert op["total"] >= 15 and op["by_mode"].get("negative"), (label, op)
    # the model ran: accepted requests were answered (and their bodies checked against the schema)
    assert ops["POST /v1/chat/completions"]["by_status"].get("200"), ops
