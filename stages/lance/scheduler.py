"""Lance's flow-matching schedule, CFG combination and Euler step (lance_spec.md §3.4, §3.5).

Kept apart from the model (diffusers style): the loop asks the scheduler for sigmas, whether a step
uses CFG, how to combine the two velocities and how to step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .requests import DenoiseParams


def shifted_sigmas(num_steps: int, shift: float) -> torch.Tensor:
    """sigma = shift*u / (1 + (shift-1)*u), u = linspace(1, 0, N+1): N+1 points for N steps."""
    u = torch.linspace(1, 0, num_steps + 1)
    return shift * u / (1 + (shift - 1) * u)


def combine_cfg(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float,
                renorm: str = "global", renorm_min: float = 0.0) -> torch.Tensor:
    """v = v_u + s (v_c - v_u), then rescaled so its norm does not exceed the cond velocity's.

    Tensors are [..., tokens, channels]; "global" norms are over all tokens and channels of one
    request (the leading dims are a batch of requests), "channel" per token.
    """
    v = v_uncond + scale * (v_cond - v_uncond)
    if renorm == "global":
        dims = (-2, -1)
    elif renorm == "channel":
        dims = (-1,)
    else:
        return v
    ratio = v_cond.norm(dim=dims, keepdim=True) / (v.norm(dim=dims, keepdim=True) + 1e-8)
    return v * ratio.clamp(min=renorm_min, max=1.0)


@dataclass
class FlowMatchEulerScheduler:
    params: DenoiseParams

    def __post_init__(self):
        self.sigmas = shifted_sigmas(self.params.num_inference_steps, self.params.timestep_shift)

    @property
    def num_steps(self) -> int:
        return self.params.num_inference_steps

    def uses_cfg(self, step: int) -> bool:
        lo, hi = self.params.cfg_interval
        s = float(self.sigmas[step])
        return self.params.uses_cfg and lo < s <= hi

    def guide(self, v_cond: torch.Tensor, v_uncond: torch.Tensor) -> torch.Tensor:
        p = self.params
        return combine_cfg(v_cond, v_uncond, p.cfg_text_scale, p.cfg_renorm_type, p.cfg_renorm_min)

    def step(self, x: torch.Tensor, v: torch.Tensor, step: int) -> torch.Tensor:
        dt = self.sigmas[step] - self.sigmas[step + 1]
        return x - v * dt.to(x.dtype)
