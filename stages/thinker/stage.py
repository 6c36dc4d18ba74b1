"""`ThinkerStage`: the thinker as a Ray Serve deployment (one AsyncLLM per replica).

The builder applies `.options()` from the stage graph (replicas, resources, runtime_env) and binds
`ThinkerStage(model=..., variant=..., engine_args=...)`, engine_args being the stage graph's `engine:`
mapping (vLLM's own names). The work is done by `Thinker` (thinker.py); Serve also calls
`check_health` periodically.
"""
from __future__ import annotations

from ray import serve

from .thinker import Thinker


@serve.deployment
class ThinkerStage(Thinker):
    def __init__(self, model: str, engine_args: dict | None = None, variant: str | None = None, **kwargs):
        super().__init__(model, engine_args, variant, **kwargs)

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            self.shutdown()
