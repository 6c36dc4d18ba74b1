"""The DiT stage: denoises thinker hand-offs with Lance's generation expert and decodes them to images.

    model.py       the DiT's part of Lance (no lm_head, two marker rows), loaded lazily and strictly
    engine.py      DenoiseEngine - many requests' steps in shared forwards (plain Python)
    forward.py     ReferenceForward (the model core) and FastForward (packed, fused) velocity forwards
    kernels.py     fused element-wise ops (Triton) and their plain torch references
    vae_decode.py  FrameDecoder - single-frame Wan2.2 decode as a 2-D network
    runner.py      DiTRunner - load, engine, VAE decode to PNG (no Ray)
    cfg_parallel.py  CFG-parallel denoising: a request's two CFG branches on two devices
    stage.py       the Ray Serve deployments, imported lazily: `stages.dit:DiTStage` (one device, batched),
                   `stages.dit:CfgParallelDiTStage` (two devices per request)
"""


def __getattr__(name):
    if name in ("DiTStage", "CfgParallelDiTStage"):  # keeps `import stages.dit.engine` free of Ray
        from . import stage

        return getattr(stage, name)
    raise AttributeError(name)
