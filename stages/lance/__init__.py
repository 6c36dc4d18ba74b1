"""The Lance model core shared by the thinker and DiT stages (configs, checkpoint, sequences, MoT, VAE, ViT).

`from stages.lance import LancePipeline` gives the offline (single-process) pipeline; it is imported
lazily so that light modules (config, sequence) stay cheap to import in vLLM worker processes.
"""

__all__ = ["LancePipeline"]


def __getattr__(name):
    if name == "LancePipeline":
        from .pipeline import LancePipeline
        return LancePipeline
    raise AttributeError(name)
