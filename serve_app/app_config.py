"""What a Serve config says to this application: its import path, its args, and the deployment names.

Pure on purpose (pydantic and the torch-free key/host-rule checks only): the deploy tooling checks a manifest's serveConfigV2 with it
without importing the builder (which imports Ray Serve and the stages).
"""
from __future__ import annotations

from typing import Optional

from pydantic import PositiveFloat, PositiveInt, ValidationError, field_validator

from .auth import check_key
from .safe_fetch import parse_host_rule
from .strict_model import StrictModel, error_lines

BUILDER_IMPORT_PATH = "serve_app.builder:build_app"
# The Serve deployment names build_app gives the stages (a Serve config's `deployments` use them).
DEPLOYMENT_NAMES = {"ingress": "LanceIngress", "thinker": "ThinkerStage", "dit": "DiTStage"}


def stage_key(stage: str, variant_index: int, variant: str) -> str:
    """A stage's key in a graph serving several variants: "thinker" / "dit" for its first variant,
    "thinker@<variant>" / "dit@<variant>" for the others (StageGraph.deployment_options uses them)."""
    return stage if variant_index == 0 else f"{stage}@{variant}"


def deployment_name(key: str) -> str:
    """The Serve deployment build_app gives a stage key: the first variant's stages keep the plain
    names, another variant's get its name appended (ThinkerStage_Lance_3B_Video)."""
    stage, _, variant = key.partition("@")
    return DEPLOYMENT_NAMES[stage] + (f"_{variant}" if variant else "")


class AppArgs(StrictModel):
    """`args` of the application (documented in serve_app/builder.py)."""

    stage_graph: str = "auto"
    model: Optional[str] = None
    served_model_name: Optional[str] = None
    allow_remote_images: bool = False
    request_timeout_s: PositiveFloat = 600.0
    max_image_bytes: PositiveInt = 20 * 2**20
    max_video_bytes: PositiveInt = 64 * 2**20       # an uploaded video (video_edit / x2t_video)
    video_store_max_jobs: PositiveInt = 64          # /v1/videos jobs kept (queued, running, finished)
    video_store_max_bytes: PositiveInt = 2 * 2**30  # bytes of finished MP4s the /v1/videos store holds
    video_ttl_s: PositiveFloat = 3600.0             # a finished /v1/videos job is deleted after this
    api_keys: list[str] = []
    remote_image_hosts: list[str] = []
    remote_image_timeout_s: PositiveFloat = 10.0

    @field_validator("remote_image_hosts")
    @classmethod
    def _host_rules(cls, hosts: list[str]) -> list[str]:
        for h in hosts:
            parse_host_rule(h)   # ValueError naming the entry
        return hosts

    @field_validator("api_keys")
    @classmethod
    def _sendable_keys(cls, keys: list[str]) -> list[str]:
        return [check_key(k) for k in keys]


def parse_app_args(args: dict | None) -> AppArgs:
    try:
        return AppArgs.model_validate(args or {})
    except ValidationError as e:
        lines = [f"args.{key}: {msg}" for key, msg in error_lines(e)]
        raise ValueError(f"invalid {BUILDER_IMPORT_PATH} args:\n  " + "\n  ".join(lines)) from None
