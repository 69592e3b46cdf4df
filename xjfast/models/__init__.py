"""Models built on xjfast's ops: the causal DiT, decoders, the tiny text encoder, presets."""
from xjfast.models.dit import CausalDiT, DiTConfig
from xjfast.models.presets import PRESETS, build

__all__ = ["CausalDiT", "DiTConfig", "PRESETS", "build"]
