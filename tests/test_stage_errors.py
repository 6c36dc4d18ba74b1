"""Which stage failures the ingress retries: a dead or unreachable replica, or a hand-off whose KV
objects died with their owner, is a StageUnavailable (retryable 503); overload and request problems
are not. (The retries themselves run against real replicas in tests/test_serve_hardening_e2e.py.)"""
from __future__ import annotations

from ray import exceptions as ray_exc
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from serve_app.errors import StageUnavailable, stage_error
from stages.thinker.errors import ContextTooLongError


def test_dead_or_unreachable_replicas_are_retryable():
    for exc in (ray_exc.ActorDiedError(), ray_exc.ActorUnavailableError("gone", b"\0" * 16),
                DeploymentUnavailableError("DiTStage")):
        err = stage_error(exc, "dit")
        assert isinstance(err, StageUnavailable) and err.status == 503, exc
        assert (err.stage, err.handoff_lost, err.code) == ("dit", False, "stage_unavailable")


def test_lost_kv_objects_mean_a_new_prefill():
    lost = ray_exc.OwnerDiedError("ab" * 14, None, "")
    for exc in (lost, ray_exc.RayTaskError("generate_image", "tb", lost)):
        err = stage_error(exc, "dit")
        assert isinstance(err, StageUnavailable) and err.handoff_lost, exc
        assert "tb" not in err.message


def test_overload_and_request_errors_are_not_retried():
    busy = stage_error(BackPressureError(num_queued_requests=8, max_queued_requests=8), "dit")
    assert busy.status == 503 and busy.code == "overloaded" and not isinstance(busy, StageUnavailable)
    too_long = stage_error(ContextTooLongError(5000, 4096, "context"), "thinker")
    assert too_long.status == 400 and not isinstance(too_long, StageUnavailable)
    bug = stage_error(ValueError("bad"), "dit")
    assert bug.status == 500 and not isinstance(bug, StageUnavailable)


def test_a_dead_vllm_engine_is_retryable_through_ray():
    """The thinker's vLLM engine died under a request: the replica is as good as dead (its
    check_health fails and Serve replaces it), so the request is run again; it reaches the
    ingress wrapped in Ray's task error, whose traceback the client never sees."""
    from vllm.v1.engine.exceptions import EngineDeadError

    dead = EngineDeadError()
    for exc in (dead, ray_exc.RayTaskError("prefill_context", "Traceback (most recent call last)", dead)):
        err = stage_error(exc, "thinker")
        assert isinstance(err, StageUnavailable) and err.stage == "thinker" and not err.handoff_lost, exc
        assert "Traceback" not in err.message and "engine died" in err.message
    # an actor that died under a stage's own call (the thinker's export registry) as well
    nested = ray_exc.RayTaskError("prefill_context", "tb", ray_exc.ActorDiedError())
    assert isinstance(stage_error(nested, "thinker"), StageUnavailable)
    # an actor that died under the DiT's call (not the DiT replica itself): the hand-off's owner
    for wrapped in (ray_exc.RayTaskError("generate_image", "tb", ray_exc.ActorDiedError()),
                    ray_exc.RayTaskError("generate_image", "tb", ray_exc.ActorDiedError()).as_instanceof_cause()):
        upstream = stage_error(wrapped, "dit")
        assert isinstance(upstream, StageUnavailable) and upstream.handoff_lost, type(wrapped)
