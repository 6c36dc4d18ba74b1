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


class AppArgs(StrictModel):
    """`args` of the application (documented in serve_app/builder.py)."""

    stage_graph: str = "auto"
    model: Optional[str] = None
    served_model_name: Optional[str] = None
    allow_remote_images: bool = False
    request_timeout_s: PositiveFloat = 600.0
    max_image_bytes: PositiveInt = 20 * 2**20
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
