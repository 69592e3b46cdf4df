"""Weights for CausalDiT: the original Wan2.1 checkpoint layout (CausalDiT's own names) and
diffusers' WanTransformer3DModel layout, from a state dict, a .safetensors file, or a folder of
(sharded) .safetensors files; also inside the training checkpoints of the streaming models
distilled from Wan2.1 (Self-Forcing, CausVid, LongLive: {"generator": {"model.<Wan2.1 name>": ...}})."""
from __future__ import annotations

import glob
import json
import os
import re

import torch

from xjfast.errors import check_positive, is_int

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


SHARD = re.compile(r".*-\d{5}-of-\d{5}\.safetensors$")
INDEX_SUFFIX = ".safetensors.index.json"
PATCH_KEY = "patch_embedding.weight"  # in both layouts
# the keys config_from_state reads the architecture from
STRUCTURE_KEYS = (PATCH_KEY, "blocks.0.ffn.0.weight", "text_embedding.0.weight",
                  "time_embedding.0.weight")


def _checkpoint_files(path: str) -> list[str]:
    """The files of the checkpoint at `path`: a file; a folder's index json's shards (exactly
    those); or a folder's one .safetensors file, or its -0000i-of-0000n shards."""
    if path.endswith(INDEX_SUFFIX) and os.path.isfile(path):
        index = _read_json(path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(name, str) for name in weight_map.values()):
            raise ValueError(f"path_or_state_dict: {path} has no weight_map of key -> file name (not a safetensors "
                             f"index)")
        files = [os.path.join(os.path.dirname(path), name) for name in sorted(set(weight_map.values()))]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise FileNotFoundError(f"path_or_state_dict: shards named in {path} are missing: {missing}")
        return files
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"path_or_state_dict: {path} does not exist")
    indexes = sorted(glob.glob(os.path.join(path, "*" + INDEX_SUFFIX)))
    if len(indexes) > 1:
        raise ValueError(f"path_or_state_dict: {path} holds several safetensors indexes {indexes}: pass one of them")
    if indexes:
        return _checkpoint_files(indexes[0])
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"path_or_state_dict: no .safetensors files in {path}")
    if len(files) > 1 and not all(SHARD.match(f) for f in files):
        raise ValueError(f"path_or_state_dict: {path} holds several .safetensors files that are not the shards of one "
                         f"checkpoint (name-0000i-of-0000n.safetensors, or an index json): "
                         f"{[os.path.basename(f) for f in files]}; pass the file to load")
    return files


def read_tensor_file(path: str, argument: str, kind: str | None = None):
    """The contents of a .safetensors file (a dict of tensors) or of a torch.save file (loaded on
    the CPU with weights_only); a ValueError "`argument`: `path` is not a readable `kind` (why)"
    otherwise, `kind` defaulting to the format's name."""
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(path)
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"{argument}: {path} is not a readable {kind or 'safetensors file'} ({exc})") from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load fails in many ways on what is not a tensor file
        raise ValueError(f"{argument}: {path} is not a readable {kind or 'torch.save file'} ({type(exc).__name__}: "
                         f"{exc})") from exc


def _read_file(file: str) -> dict:
    state = read_tensor_file(file, "path_or_state_dict", "checkpoint")
    weights = _weights_of(state) if isinstance(state, dict) else None
    if weights is None:
        raise ValueError(f"path_or_state_dict: {file} is not a readable checkpoint (not a state dict of tensors"
                         + (f", {_nested_hint(state)})" if isinstance(state, dict) else ")"))
    return weights


# where a training checkpoint keeps the weights to run, first found first: Self-Forcing, CausVid and
# LongLive save {"generator": ..., "generator_ema": ...} and infer with the EMA weights
TRAINING_KEYS = ("generator_ema", "generator", "state_dict", "model", "module")


def _all_tensors(state: dict) -> bool:
    return all(isinstance(v, torch.Tensor) for v in state.values())


def _weights_of(checkpoint: dict) -> dict | None:
    """`checkpoint` if it is a state dict of tensors, else the one a training checkpoint holds
    under TRAINING_KEYS, else None."""
    if _all_tensors(checkpoint):
        return checkpoint
    key = next((k for k in TRAINING_KEYS if isinstance(checkpoint.get(k), dict) and _all_tensors(checkpoint[k])), None)
    return None if key is None else checkpoint[key]


def _nested_hint(checkpoint: dict) -> str:
    return (f"nor a training checkpoint holding one under {', '.join(map(repr, TRAINING_KEYS))} (its keys: "
            f"{sorted(map(str, checkpoint))[:8]})")


def without_wrapper_prefix(state: dict) -> dict:
    """The DiT's own weights when a training wrapper holds it (Self-Forcing's "model.", DDP's
    "module.", torch.compile's "_orig_mod."): the keys under the one prefix of patch_embedding.weight,
    stripped; the wrapper's other modules are left out. A state with the DiT at its root is returned
    as it is; one with several DiTs under different prefixes is refused, naming them."""
    prefixes = sorted({k[:-len(PATCH_KEY)] for k in state if k.endswith(PATCH_KEY)})
    if len(prefixes) > 1:
        raise ValueError(f"path_or_state_dict: the checkpoint holds several models, their weights under the prefixes "
                         f"{prefixes}: pass the state dict of one")
    if not prefixes or prefixes == [""]:
        return state
    return {k[len(prefixes[0]):]: v for k, v in state.items() if k.startswith(prefixes[0])}


MODEL_CLASSES = ("WanModel", "WanTransformer3DModel")


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"path_or_state_dict: {path} is not readable JSON ({exc})") from exc


def _model_config(path: str) -> dict:
    """The config.json at `path` when it describes a Wan2.1 / diffusers Wan transformer (its class,
    or Wan2.1's `dim` and `num_layers`), else {}: a folder may hold other models' configs."""
    if not os.path.isfile(path):
        return {}
    config = _read_json(path)
    if isinstance(config, dict) and (config.get("_class_name") in MODEL_CLASSES
                                     or {"dim", "num_layers"} <= set(config)):
        return config
    return {}


def read_state(path_or_state) -> tuple[dict, dict]:
    """(state dict, config.json contents or {}) from a dict, a .safetensors/.pt file, a
    safetensors index json, or a folder (its config.json, or the one beside a file)."""
    if isinstance(path_or_state, dict):
        weights = _weights_of(path_or_state)
        if weights is None:
            kinds = {type(v).__name__ for v in path_or_state.values() if not isinstance(v, torch.Tensor)}
            raise TypeError(f"path_or_state_dict: expected a state dict of tensors, got values of type {sorted(kinds)}, "
                            f"{_nested_hint(path_or_state)}")
        return dict(weights), {}
    if not isinstance(path_or_state, (str, os.PathLike)):
        raise TypeError(f"path_or_state_dict: expected a path or a state dict, got {type(path_or_state).__name__}")
    path = os.fspath(path_or_state)
    files = _checkpoint_files(path)
    config = _model_config(os.path.join(path if os.path.isdir(path) else os.path.dirname(path), "config.json"))
    state = {}
    for file in files:
        part = _read_file(file)
        repeated = sorted(set(part) & set(state))
        if repeated:
            raise ValueError(f"path_or_state_dict: {file} repeats keys of the files before it: {repeated[:5]}")
        state.update(part)
    return state, config


def config_from_state(state: dict, config: dict, heads: int | None):
    """DiTConfig inferred from weight shapes; heads from `heads`, config.json, or dim // 128 (Wan2.1)."""
    from xjfast.models.dit import DiTConfig
    from xjfast.ops.temporal_attention import HEAD_DIMS
    missing = [k for k in STRUCTURE_KEYS if k not in state]
    blocks = [int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))]
    if missing or not blocks:
        raise ValueError(f"path_or_state_dict: the checkpoint does not match CausalDiT: missing keys "
                         f"{missing or ['blocks.*']}")
    patch = state["patch_embedding.weight"]
    dim = patch.shape[0]
    if heads is None:
        heads = config.get("num_heads") or config.get("num_attention_heads") or dim // 128
    if not is_int(heads) or heads < 1 or dim % heads or dim // heads not in HEAD_DIMS:
        raise ValueError(f"heads: expected a head count that splits dim {dim} into heads of {HEAD_DIMS} channels, "
                         f"got {heads!r}")
    eps = config.get("eps", 1e-6)
    check_positive("eps (config.json)", eps)
    return DiTConfig(in_channels=patch.shape[1], dim=dim, ffn_dim=state["blocks.0.ffn.0.weight"].shape[0],
                     heads=heads, layers=1 + max(blocks), text_dim=state["text_embedding.0.weight"].shape[1],
                     freq_dim=state["time_embedding.0.weight"].shape[1], patch_size=tuple(patch.shape[2:]),
                     eps=eps)
