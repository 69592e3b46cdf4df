"""Prompt embeddings from a file: the conditioning a text encoder xjfast does not ship (Wan2.1's
UMT5-XXL) computed elsewhere, e.g. by diffusers' `WanPipeline.encode_prompt`, and saved with
`torch.save` or safetensors."""
from __future__ import annotations

import os

import torch

from xjfast.models.weights import read_tensor_file

# the key of a file holding several tensors, as diffusers names a pipeline's argument
EMBEDS_KEY = "prompt_embeds"


def load_prompt_embeds(path, text_dim: int | None = None) -> torch.Tensor:
    """[S, D] embeddings (float, on the CPU) from a .safetensors file or a torch.save file that holds
    one tensor, or several with one named "prompt_embeds": shaped [S, D], or [1, S, D] as an
    encoder's batch of one. With `text_dim`, D must equal it. A ValueError names the file and
    what it holds instead."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path: no prompt embeddings file at {path}")
    contents = read_tensor_file(path, "path")
    if isinstance(contents, dict):
        tensors = {k: v for k, v in contents.items() if isinstance(v, torch.Tensor)}
        if EMBEDS_KEY in tensors:
            contents = tensors[EMBEDS_KEY]
        elif len(tensors) == 1:
            contents = next(iter(tensors.values()))
        else:
            raise ValueError(f"path: {path} holds {len(tensors)} tensors {sorted(tensors)[:5]}, none named "
                             f"{EMBEDS_KEY!r}: expected one tensor of prompt embeddings")
    if not isinstance(contents, torch.Tensor):
        raise ValueError(f"path: {path} holds a {type(contents).__name__}, expected a tensor of prompt embeddings")
    embeds = contents[0] if contents.dim() == 3 and contents.shape[0] == 1 else contents
    if embeds.dim() != 2 or 0 in embeds.shape or not embeds.is_floating_point():
        raise ValueError(f"path: {path} holds a {contents.dtype} tensor of shape {tuple(contents.shape)}, expected "
                         f"float embeddings [tokens, dim] or [1, tokens, dim]")
    if text_dim is not None and embeds.shape[1] != text_dim:
        raise ValueError(f"path: {path} holds embeddings of dim {embeds.shape[1]}, expected the model's text_dim "
                         f"{text_dim} (shape {tuple(contents.shape)})")
    if not torch.isfinite(embeds).all():
        raise ValueError(f"path: {path} holds embeddings with NaN or infinite values")
    return embeds.float()

