"""The DiT stage: denoises thinker hand-offs with Lance's generation expert and decodes them to images.

    model.py       the DiT's part of Lance (no lm_head, two marker rows), loaded lazily and strictly
    engine.py      DenoiseEngine - many requests' steps in shared forwards (plain Python)
    forward.py     ReferenceForward (the model core) and FastForward (packed, fused) velocity forwards
    kernels.py     fused element-wise ops (Triton) and their plain torch references
    vae_decode.py  FrameDecoder - single-frame Wan2.2 decode as a 2-D network
    runner.py      DiTRunner - load, engine, VAE decode to PNG (no Ray)
    stage.py       DiTStage - the Ray Serve deployment (imported lazily: `stages.dit:DiTStage`)
"""


def __getattr__(name):
    if name == "DiTStage":  # keeps `import stages.dit.engine` free of Ray
        from .stage import DiTStage

        return DiTStage
    raise AttributeError(name)
