"""Rounding an fp32 update into bf16/fp16 parameters (the plan engine's ``param_rounding``).

Round-to-nearest loses every update smaller than half a bf16 step of the weight (about 2⁻⁹ of
its magnitude), so small learning rates stall in pure-bf16 training. Stochastic rounding rounds
up with probability equal to the remainder's share of the step, so the expected stored value is
the fp32 value (Gupta et al., "Deep Learning with Limited Numerical Precision", 2015); torchao
and heavyball offer it for their bf16 optimizers.

bf16 is the upper 16 bits of fp32: adding a uniform 16-bit integer to an fp32 bit pattern and
clearing the low 16 bits rounds its magnitude up with exactly that probability.
"""

from __future__ import annotations

import torch


def round_to_bf16_stochastic(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """`x` (fp32, or anything `.float()` takes exactly) rounded to bf16, stochastically: to one
    of the two bf16 values around it, the one farther away with probability equal to its
    distance's share of the step. Values that are bf16 already, infinities and NaNs are kept.
    Reproducible under a seeded `generator` (on `x`'s device)."""
    x32 = x.float().contiguous()
    bits = x32.view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device, generator=generator)
    rounded = ((bits + noise) & -(1 << 16)).view(torch.float32)   # low 16 bits cleared: exactly a bf16
    return torch.where(torch.isfinite(x32), rounded, x32).to(torch.bfloat16)


def round_stochastic(x: torch.Tensor, dtype: torch.dtype, generator: torch.Generator | None = None) -> torch.Tensor:
    """`x` rounded stochastically to `dtype` (bf16 or fp16; other dtypes round to nearest): to one
    of the two representable neighbours, the farther with probability equal to its distance's
    share of the gap, so the expected result is `x`. Non-finite values are kept; a value beyond
    the dtype's range becomes infinite, as round-to-nearest makes it."""
    if dtype == torch.bfloat16:
        return round_to_bf16_stochastic(x, generator)
    if dtype != torch.float16:
        return x.to(dtype)
    x32 = x.float()
    near = x32.to(dtype)
    toward = torch.where(x32 > near.float(), torch.inf, -torch.inf).to(dtype)
    other = torch.nextafter(near, toward)                       # the neighbour on x's other side
    gap = (other.float() - near.float()).abs()
    share = torch.where(gap > 0, (x32 - near.float()).abs() / gap, 0.0)   # x's distance from `near`, 0–0.5
    u = torch.rand(x32.shape, device=x32.device, generator=generator)
    return torch.where(torch.isfinite(x32) & (u < share), other, near)


__all__ = ["round_stochastic", "round_to_bf16_stochastic"]
