"""A small deterministic text encoder for the tiny preset: UTF-8 bytes -> seeded embedding
table + sinusoidal positions -> two fixed residual MLP layers -> [tokens, text_dim].

It is no language model: equal prompts give equal embeddings and different prompts different
ones, which is what a stream needs to exercise conditioning and prompt switching on a CPU.
"""
from __future__ import annotations

import torch

from xjfast.models.dit import sinusoidal_embedding


class ByteTextEncoder(torch.nn.Module):
    def __init__(self, text_dim: int, max_tokens: int = 32, seed: int = 1234):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.max_tokens = max_tokens
        self.register_buffer("table", torch.randn(257, text_dim, generator=g))  # 256 bytes + padding
        self.register_buffer("w1", torch.randn(2, text_dim, text_dim, generator=g) / text_dim ** 0.5)
        self.register_buffer("w2", torch.randn(2, text_dim, text_dim, generator=g) / text_dim ** 0.5)

    @torch.no_grad()
    def forward(self, prompt: str) -> torch.Tensor:
        """[1, max_tokens, text_dim] embeddings of `prompt` (truncated or padded)."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt: expected a str, got {type(prompt).__name__}")
        ids = list(prompt.encode("utf-8"))[: self.max_tokens]
        ids += [256] * (self.max_tokens - len(ids))
        x = self.table[torch.tensor(ids, device=self.table.device)]
        x = x + sinusoidal_embedding(torch.arange(self.max_tokens, device=x.device), x.shape[-1])
        for w1, w2 in zip(self.w1, self.w2):
            x = x + torch.nn.functional.gelu(x @ w1) @ w2
        return x[None]
