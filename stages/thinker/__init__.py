"""The thinker stage: Lance's context prefill and text generation on vLLM (see stage.py).

Import-light on purpose: vLLM imports `stages.thinker.plugin` and `stages.thinker.connector` in every
engine process, which must not pull in Ray Serve.
"""


def __getattr__(name: str):
    if name == "ThinkerStage":
        from .stage import ThinkerStage

        return ThinkerStage
    raise AttributeError(name)
