"""Latent -> RGB decoders, temporal x4 (a latent frame decodes to 4 video frames, as Wan's VAE).

- PreviewDecoder: for Wan-shaped latents (16 channels): a fixed 16 -> 3 linear map and 8x
  spatial upsampling, as latent previews do. It is a preview, not the VAE.
- TinyDecoder: the tiny preset's own small decoder: the same linear map followed by a fixed
  3x3 smoothing after each 2x upsampling, so its frames look like images rather than blocks.
Both interpolate linearly from the previous latent frame to the current one across the 4
video frames, so a stream decodes without a jump at each latent frame.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

VIDEO_FRAMES_PER_LATENT = 4
SPATIAL_UPSAMPLE = 8


class PreviewDecoder(torch.nn.Module):
    def __init__(self, latent_channels: int = 16, seed: int = 4321):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        factors = torch.randn(latent_channels, 3, generator=g)
        self.register_buffer("factors", factors / factors.norm(dim=0, keepdim=True) * 0.6)
        self.register_buffer("bias", torch.tensor([0.5, 0.5, 0.5]))

    def to_rgb(self, latent: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] -> [B, 3, 8h, 8w] in [0, 1]."""
        rgb = torch.einsum("bchw,cr->brhw", latent.float(), self.factors) + self.bias[None, :, None, None]
        return F.interpolate(rgb, scale_factor=SPATIAL_UPSAMPLE, mode="bilinear", align_corners=False)

    @torch.no_grad()
    def forward(self, latents: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
        """latents [B, C, F, h, w] (the block) -> uint8 video frames [4F, 8h, 8w, 3] of sample 0."""
        frames = []
        prev = latents[:, :, 0] if previous is None else previous
        for f in range(latents.shape[2]):
            cur = latents[:, :, f]
            for step in range(1, VIDEO_FRAMES_PER_LATENT + 1):
                mix = prev + (cur - prev) * (step / VIDEO_FRAMES_PER_LATENT)
                frames.append(self.to_rgb(mix)[0])
            prev = cur
        video = torch.stack(frames).clamp(0, 1).mul(255).round().to(torch.uint8)
        return video.permute(0, 2, 3, 1).contiguous()


class TinyDecoder(PreviewDecoder):
    def __init__(self, latent_channels: int = 4, seed: int = 4321):
        super().__init__(latent_channels, seed)
        self.register_buffer("smooth", torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16)

    def to_rgb(self, latent: torch.Tensor) -> torch.Tensor:
        rgb = torch.einsum("bchw,cr->brhw", latent.float(), self.factors) + self.bias[None, :, None, None]
        kernel = self.smooth.expand(3, 1, 3, 3)
        for _ in range(3):  # 2x three times: 8x
            rgb = F.interpolate(rgb, scale_factor=2, mode="nearest")
            rgb = F.conv2d(F.pad(rgb, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
        return rgb
