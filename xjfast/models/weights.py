"""Weights for CausalDiT: the original Wan2.1 checkpoint layout (CausalDiT's own names) and
diffusers' WanTransformer3DModel layout, from a state dict, a .safetensors file, or a folder of
(sharded) .safetensors files."""
from __future__ import annotations

import glob
import json
import os
import pickle
import re

import torch

# diffusers name -> Wan2.1 name, applied to the start of each key (after the block prefix)
_DIFFUSERS_TO_WAN = [
    (r"^scale_shift_table$", "head.modulation"),
    (r"^proj_out\.", "head.head."),
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^(blocks\.\d+)\.scale_shift_table$", r"\1.modulation"),
    (r"^(blocks\.\d+)\.attn1\.to_out\.0\.", r"\1.self_attn.o."),
    (r"^(blocks\.\d+)\.attn2\.to_out\.0\.", r"\1.cross_attn.o."),
    (r"^(blocks\.\d+)\.attn1\.to_([qkv])\.", r"\1.self_attn.\2."),
    (r"^(blocks\.\d+)\.attn2\.to_([qkv])\.", r"\1.cross_attn.\2."),
    (r"^(blocks\.\d+)\.attn1\.norm_", r"\1.self_attn.norm_"),
    (r"^(blocks\.\d+)\.attn2\.norm_", r"\1.cross_attn.norm_"),
    (r"^(blocks\.\d+)\.norm2\.", r"\1.norm3."),
    (r"^(blocks\.\d+)\.ffn\.net\.0\.proj\.", r"\1.ffn.0."),
    (r"^(blocks\.\d+)\.ffn\.net\.2\.", r"\1.ffn.2."),
]


def is_diffusers_layout(state: dict) -> bool:
    return any(k.startswith(("condition_embedder.", "proj_out.")) or ".attn1." in k for k in state)


def diffusers_to_wan(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        new = key
        for pattern, replacement in _DIFFUSERS_TO_WAN:
            new, n = re.subn(pattern, replacement, key)
            if n:
                break
        out[new] = value
    return out


def read_state(path_or_state) -> tuple[dict, dict]:
    """(state dict, config.json contents or {}) from a dict, a .safetensors/.pt file or a folder."""
    if isinstance(path_or_state, dict):
        return dict(path_or_state), {}
    if not isinstance(path_or_state, (str, os.PathLike)):
        raise TypeError(f"path_or_state_dict: expected a path or a state dict, got {type(path_or_state).__name__}")
    path = os.fspath(path_or_state)
    config = {}
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            raise FileNotFoundError(f"path_or_state_dict: no .safetensors files in {path}")
        if os.path.exists(os.path.join(path, "config.json")):
            with open(os.path.join(path, "config.json")) as f:
                config = json.load(f)
    elif os.path.isfile(path):
        files = [path]
    else:
        raise FileNotFoundError(f"path_or_state_dict: {path} does not exist")
    state = {}
    for file in files:
        if file.endswith(".safetensors"):
            from safetensors import SafetensorError
            from safetensors.torch import load_file
            read, unreadable = load_file, (SafetensorError, OSError)
        else:
            read = lambda f: torch.load(f, map_location="cpu", weights_only=True)  # noqa: E731
            unreadable = (OSError, RuntimeError, pickle.UnpicklingError, EOFError)
        try:
            state.update(read(file))
        except unreadable as exc:
            raise ValueError(f"path_or_state_dict: {file} is not a readable checkpoint ({exc})") from exc
    return state, config


def config_from_state(state: dict, config: dict, heads: int | None):
    """DiTConfig inferred from weight shapes; heads from `heads`, config.json, or dim // 128 (Wan2.1)."""
    from xjfast.models.dit import DiTConfig
    patch = state["patch_embedding.weight"]
    dim = patch.shape[0]
    heads = heads or config.get("num_heads") or config.get("num_attention_heads") or dim // 128
    layers = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    return DiTConfig(in_channels=patch.shape[1], dim=dim, ffn_dim=state["blocks.0.ffn.0.weight"].shape[0],
                     heads=heads, layers=layers, text_dim=state["text_embedding.0.weight"].shape[1],
                     freq_dim=state["time_embedding.0.weight"].shape[1], patch_size=tuple(patch.shape[2:]),
                     eps=config.get("eps", 1e-6))
