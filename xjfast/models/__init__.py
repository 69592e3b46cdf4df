"""Models built on xjfast's ops: the causal DiT, decoders, the tiny text encoder, presets, prompt
embeddings from a file."""
from xjfast.models.dit import CausalDiT, DiTConfig
from xjfast.models.presets import PRESETS, build
from xjfast.models.prompt_embeds import load_prompt_embeds

__all__ = ["CausalDiT", "DiTConfig", "PRESETS", "build", "load_prompt_embeds"]
