"""FP8 e4m3 quantization as the kernels do it, in float32 PyTorch.

The kernels store e4m3 values with fp32 scales: x ~= q * scale, scale = amax / 448, so the
largest magnitude of a quantization unit lands on e4m3's largest finite value. Rounding is
round-to-nearest-even with saturation (`cvt.rn.satfinite` on the GPU).
"""
from __future__ import annotations

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
# Smallest scale used for an all-zero unit, so that 0 / scale stays 0 instead of NaN.
MIN_SCALE = 1e-12
# Probabilities are multiplied by this before their cast to e4m3 (DESIGN.md: scaled P), so
# weights down to ~1e-5 of the row maximum survive instead of flushing below 2^-9.
P_SCALE = E4M3_MAX


def scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """fp32 scale that maps `amax` onto e4m3's largest finite value."""
    return amax.float().clamp_min(MIN_SCALE * E4M3_MAX) / E4M3_MAX


def to_e4m3(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale rounded to e4m3 (saturating), as a float8_e4m3fn tensor."""
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def round_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 values to the e4m3 grid (saturating), staying in fp32."""
    return x.float().clamp(-E4M3_MAX, E4M3_MAX).to(E4M3).float()


def fake_quant(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x quantized to e4m3 with `scale` and dequantized back, in fp32."""
    return round_e4m3(x.float() / scale) * scale
