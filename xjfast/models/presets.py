"""Model presets: `tiny` (a stream at interactive speed on a 2-core CPU) and `wan2.1-1.3b`
(Wan2.1-T2V-1.3B's shape, random weights with a fixed seed, for benchmarking)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from xjfast.errors import is_int
from xjfast.models.decoder import PreviewDecoder, TinyDecoder
from xjfast.models.dit import CausalDiT, DiTConfig
from xjfast.models.text_encoder import ByteTextEncoder


@dataclass(frozen=True)
class Preset:
    name: str
    dit: DiTConfig
    latent_hw: tuple          # latent height, width (video is 8x)
    text_tokens: int
    fps: int                  # video frames per second of the written stream
    text_encoder: bool        # takes prompts as text (else text embeddings)


PRESETS = {
    "tiny": Preset("tiny", DiTConfig(in_channels=4, dim=128, ffn_dim=512, heads=2, layers=4, text_dim=64,
                                     freq_dim=64), (16, 16), 16, 16, True),
    "wan2.1-1.3b": Preset("wan2.1-1.3b", DiTConfig(), (60, 104), 512, 16, False),
}


def init_weights(model: torch.nn.Module, seed: int) -> None:
    """Deterministic random weights: N(0, 0.02) matrices, zero biases (LayerNorm/RMSNorm at 1),
    so activations stay in range across 30 blocks."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("modulation"):
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
            elif name.endswith("norm_q.weight") or name.endswith("norm_k.weight") or name.endswith("norm3.weight"):
                p.fill_(1.0)
            elif p.dim() == 1:
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def build(preset: str, *, device="cpu", dtype=torch.float32, seed: int = 0, weights=None):
    """(model, decoder, text encoder or None, Preset) for a preset name: weights seeded, or loaded
    from `weights` (a Wan2.1 / diffusers checkpoint of the preset's shape)."""
    if preset not in PRESETS:
        raise ValueError(f"preset: expected one of {', '.join(map(repr, PRESETS))}, got {preset!r}")
    if not is_int(seed) or not 0 <= seed < 2 ** 64:  # what a torch.Generator takes
        raise ValueError(f"seed: expected an int in [0, 2^64), got {seed!r}")
    p = PRESETS[preset]
    if weights is not None:
        model = CausalDiT.from_pretrained(weights, heads=p.dit.heads, dtype=dtype, device=device)
        if model.cfg != p.dit:
            raise ValueError(f"weights: expected a checkpoint of the {preset} shape {p.dit}, got {model.cfg}")
        return _with_codecs(model, p, device)
    # built on the meta device and filled once: no default init to overwrite, no CPU copy of a
    # GPU model; the draws are CPU fp32 whatever the device, so a seed means the same weights
    with torch.device("meta"):
        model = CausalDiT(p.dit)
    model = model.to_empty(device=device).to(dtype)
    init_weights(model, seed)
    return _with_codecs(model.eval(), p, device)


def _with_codecs(model, p: Preset, device):
    decoder_cls = TinyDecoder if p.text_encoder else PreviewDecoder
    decoder = decoder_cls(p.dit.in_channels).to(device)
    encoder = ByteTextEncoder(p.dit.text_dim, p.text_tokens).to(device) if p.text_encoder else None
    return model, decoder, encoder, p
