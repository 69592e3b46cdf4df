"""Latent -> RGB decoders, temporal x4 (a latent frame decodes to 4 video frames, as Wan's VAE).

- PreviewDecoder: for Wan-shaped latents (16 channels): a fixed 16 -> 3 linear map (xjfast's own,
  seeded; with real weights, pass a fitted map as `factors`/`bias` buffers) and 8x bilinear
  upsampling, as latent previews do. It is a preview, not the VAE.
- TinyDecoder: the tiny preset's own small decoder: a seeded linear map of its channels and a
  fixed 3x3 smoothing after each 2x upsampling, so its frames look like images, not blocks.
Both interpolate linearly from the previous latent frame to the current one across the 4 video
frames, so a stream decodes without a jump at each latent frame. Every step is linear, so the
4 blends are formed at latent resolution and upsampled in one batched call.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

VIDEO_FRAMES_PER_LATENT = 4
SPATIAL_UPSAMPLE = 8

class PreviewDecoder(torch.nn.Module):
    def __init__(self, latent_channels: int = 16, seed: int = 1234):
        super().__init__()
        g = torch.Generator().manual_seed(seed)  # xjfast's own fixed map: each colour a unit mix of channels
        factors = torch.randn(latent_channels, 3, generator=g)
        self.register_buffer("factors", factors / factors.norm(dim=0, keepdim=True) * 0.6)
        self.register_buffer("bias", torch.zeros(3))

    def to_rgb(self, latent: torch.Tensor) -> torch.Tensor:
        """[N, C, h, w] -> [N, 3, h, w], in [-1, 1] for typical latents."""
        return torch.einsum("nchw,cr->nrhw", latent.float(), self.factors) + self.bias[None, :, None, None]

    def upsample(self, rgb: torch.Tensor) -> torch.Tensor:
        return F.interpolate(rgb, scale_factor=SPATIAL_UPSAMPLE, mode="bilinear", align_corners=False)

    @torch.no_grad()
    def forward(self, latents: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
        """latents [B, C, F, h, w] (a block), previous [B, C, h, w] (the latent frame before it, or
        None at the start) -> uint8 video frames [4F, 8h, 8w, 3] of sample 0."""
        x = latents[:1].float()
        prev = x[:, :, :1] if previous is None else previous[:1, :, None].float()
        starts = torch.cat((prev, x[:, :, :-1]), dim=2)[0].transpose(0, 1)  # [F, C, h, w]
        ends = x[0].transpose(0, 1)
        w = torch.arange(1, VIDEO_FRAMES_PER_LATENT + 1, device=x.device, dtype=x.dtype) / VIDEO_FRAMES_PER_LATENT
        mixes = starts[:, None] + (ends - starts)[:, None] * w[None, :, None, None, None]  # [F, 4, C, h, w]
        rgb = self.upsample(self.to_rgb(mixes.flatten(0, 1)))
        video = ((rgb + 1) * 127.5).clamp(0, 255).round().to(torch.uint8)
        return video.permute(0, 2, 3, 1).contiguous()


class TinyDecoder(PreviewDecoder):
    def __init__(self, latent_channels: int = 4, seed: int = 4321):
        torch.nn.Module.__init__(self)
        g = torch.Generator().manual_seed(seed)
        factors = torch.randn(latent_channels, 3, generator=g)
        self.register_buffer("factors", factors / factors.norm(dim=0, keepdim=True) * 1.2)
        self.register_buffer("bias", torch.zeros(3))
        self.register_buffer("smooth", torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16)

    def upsample(self, rgb: torch.Tensor) -> torch.Tensor:
        kernel = self.smooth.expand(3, 1, 3, 3)
        for _ in range(3):  # 2x three times: 8x
            rgb = F.interpolate(rgb, scale_factor=2, mode="nearest")
            rgb = F.conv2d(F.pad(rgb, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
        return rgb
