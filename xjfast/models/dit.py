"""CausalDiT: a causal video diffusion transformer with the Wan2.1 architecture, on xjfast's ops.

Patch embedding (1x2x2 Conv3d), sinusoidal time embedding -> MLP -> 6-way adaLN modulation per
block, self-attention with RMSNorm on q/k and 3D rotary through `temporal_attention` (block-causal
by frame, over a StreamingKVCache), cross-attention to text embeddings, GELU(tanh) FFN, and a
modulated head to patch channels. Parameter names follow Wan2.1's checkpoints.

A pass takes several frame blocks with a timestep per block (0 for the clean block of the
previous step, sigma * 1000 for the noisy one); the first `commit_frames` frames' keys and values
are committed to the cache after each layer's attention.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from xjfast.models.rope import apply_rope, rope_table
from xjfast.ops.temporal_attention import temporal_attention


@dataclass(frozen=True)
class DiTConfig:
    in_channels: int = 16
    dim: int = 1536
    ffn_dim: int = 8960
    heads: int = 12
    layers: int = 30
    text_dim: int = 4096
    freq_dim: int = 256
    patch_size: tuple = (1, 2, 2)
    eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Wan's timestep embedding: [cos | sin] of t * 10000^(-i / (dim/2))."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = t.double()[..., None] * freqs
    return torch.cat((angles.cos(), angles.sin()), dim=-1).float()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class SelfAttention(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.heads = cfg.heads
        self.q, self.k, self.v, self.o = (nn.Linear(cfg.dim, cfg.dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(cfg.dim, cfg.eps), RMSNorm(cfg.dim, cfg.eps)

    def forward(self, x, pass_args):
        B, L, _ = x.shape
        split = (B, L, self.heads, -1)
        q = self.norm_q(self.q(x)).view(split)
        k = self.norm_k(self.k(x)).view(split)
        v = self.v(x).view(split)
        cache, layer = pass_args["cache"], pass_args["layer"]
        # keys are cached with their spatial rotary only; the temporal one is applied by the
        # attention op by cache slot, or here by frame position when there is no cache
        q, k = apply_rope(q, pass_args["rope"]), apply_rope(k, pass_args["rope"])
        q_att, k_att = q, k
        if cache is None:
            q_att, k_att = apply_rope(q, pass_args["rope_t"]), apply_rope(k, pass_args["rope_t"])
        out = temporal_attention(q_att, k_att, v, block_tokens=pass_args["block_tokens"],
                                 private_blocks=pass_args["private_blocks"], kv_cache=cache,
                                 layer=layer if cache is not None else None, precision=pass_args["precision"],
                                 backend=pass_args["backend"],
                                 frame_slots=pass_args["frame_slots"] if cache is not None else None,
                                 frame_lags=pass_args["frame_lags"])
        commit = pass_args["commit_tokens"]
        if cache is not None and commit:
            cache.commit(layer, k[:, :commit], v[:, :commit])
        if pass_args["kv_out"] is not None:  # K/V of chosen token ranges, to commit or recache later
            ranges = pass_args["kv_tokens"]
            pass_args["kv_out"].append((torch.cat([k[:, a:b] for a, b in ranges], 1),
                                        torch.cat([v[:, a:b] for a, b in ranges], 1)))
        return self.o(out.reshape(B, L, -1))


class CrossAttention(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.heads = cfg.heads
        self.q, self.k, self.v, self.o = (nn.Linear(cfg.dim, cfg.dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(cfg.dim, cfg.eps), RMSNorm(cfg.dim, cfg.eps)

    def kv(self, context):
        """Keys and values of a prompt: computed once per prompt, reused every frame."""
        B, S, _ = context.shape
        k = self.norm_k(self.k(context)).view(B, S, self.heads, -1).transpose(1, 2)
        v = self.v(context).view(B, S, self.heads, -1).transpose(1, 2)
        return k, v

    def forward(self, x, kv):
        B, L, _ = x.shape
        q = self.norm_q(self.q(x)).view(B, L, self.heads, -1).transpose(1, 2)
        out = torch.nn.functional.scaled_dot_product_attention(q, *kv)
        return self.o(out.transpose(1, 2).reshape(B, L, -1))


class Block(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(cfg)
        self.norm3 = nn.LayerNorm(cfg.dim, cfg.eps, elementwise_affine=True)
        self.cross_attn = CrossAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.ffn_dim, cfg.dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, cfg.dim) / cfg.dim ** 0.5)

    def forward(self, x, e, kv, pass_args):
        """x [B, L, dim]; e [B, blocks, 6, dim]: the modulation of each frame block."""
        B, L, D = x.shape
        n = e.shape[1]
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = (self.modulation[:, None] + e).unbind(2)

        def modulate(h, shift, scale):  # per block: tokens [B, blocks, L/blocks, dim]
            return (h.view(B, n, L // n, D) * (1 + scale[:, :, None]) + shift[:, :, None]).view(B, L, D)

        def gated(h, gate):
            return (h.view(B, n, L // n, D) * gate[:, :, None]).view(B, L, D)

        x = x + gated(self.self_attn(modulate(self.norm1(x), shift_a, scale_a), pass_args), gate_a)
        x = x + self.cross_attn(self.norm3(x), kv)
        return x + gated(self.ffn(modulate(self.norm2(x), shift_f, scale_f)), gate_f)


class Head(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.in_channels)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim ** 0.5)

    def forward(self, x, e):
        B, L, D = x.shape
        n = e.shape[1]
        shift, scale = (self.modulation[:, None] + e[:, :, None]).unbind(2)
        h = self.norm(x).view(B, n, L // n, D) * (1 + scale[:, :, None]) + shift[:, :, None]
        return self.head(h.view(B, L, D))


class CausalDiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embedding = nn.Conv3d(cfg.in_channels, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(cfg.dim, cfg.dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, cfg.dim * 6))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.head = Head(cfg)

    @classmethod
    def from_pretrained(cls, path_or_state_dict, *, heads: int | None = None, dtype=None, device="cpu"):
        """A CausalDiT with the weights of a Wan2.1 checkpoint (its original layout) or of diffusers'
        WanTransformer3DModel: a state dict, a .safetensors (or .pt) file, a safetensors index json,
        or a folder of (sharded) files. A training checkpoint of a model distilled from Wan2.1
        (Self-Forcing, CausVid, LongLive) gives its "generator_ema" weights, else "generator", under
        their wrapper's "model." prefix (the wrapper's other modules are left out).

        The architecture is read from the weights' shapes; the head count (which shapes do not
        show) from `heads`, the config.json beside the weights, or dim // 128 as in every Wan2.1
        model. Parameters come in `dtype`, by default patch_embedding's (a checkpoint that keeps
        some modules in fp32, as diffusers' bf16 pipelines do, gives one dtype throughout).
        """
        from xjfast.errors import check_device
        from xjfast.models.weights import (config_from_state, diffusers_to_wan, is_diffusers_layout, read_state,
                                           without_wrapper_prefix)
        device = check_device("device", device)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype: expected None or a floating-point torch.dtype, got {dtype!r}")
        state, config = read_state(path_or_state_dict)
        state = without_wrapper_prefix(state)
        if is_diffusers_layout(state):
            state = diffusers_to_wan(state)
        if "patch_embedding.weight" not in state:
            raise ValueError("path_or_state_dict: no patch_embedding.weight: not a Wan2.1 or diffusers "
                             f"WanTransformer3DModel checkpoint (first keys: {sorted(state)[:5]})")
        with torch.device("meta"):
            model = cls(config_from_state(state, config, heads))
        expected = model.state_dict()
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(f"path_or_state_dict: the checkpoint does not match CausalDiT: missing keys {missing}, "
                             f"unexpected keys {unexpected}")
        shapes = {k: (tuple(state[k].shape), tuple(t.shape)) for k, t in expected.items() if state[k].shape != t.shape}
        if shapes:
            raise ValueError(f"path_or_state_dict: the checkpoint does not match CausalDiT: shapes (checkpoint, "
                             f"expected) differ for {dict(list(shapes.items())[:5])}")
        integral = sorted({str(t.dtype) for t in state.values() if not t.is_floating_point()})
        if integral:
            raise ValueError(f"path_or_state_dict: expected floating-point weights, got tensors of dtype {integral}")
        model.load_state_dict(state, assign=True)
        return model.to(device=device, dtype=dtype or state["patch_embedding.weight"].dtype).eval()

    def tokens_per_frame(self, latent_hw: tuple[int, int]) -> int:
        return (latent_hw[0] // self.cfg.patch_size[1]) * (latent_hw[1] // self.cfg.patch_size[2])

    def prompt_kv(self, context: torch.Tensor) -> list:
        """Cross-attention keys/values of every block for text embeddings [B, S, text_dim]."""
        c = self.text_embedding(context.to(self.patch_embedding.weight.dtype))
        return [block.cross_attn.kv(c) for block in self.blocks]

    def forward(self, x, timesteps, prompt_kv, *, cache=None, commit_frames=0, block_frames=1,
                private_blocks=None, precision="fp8", backend="auto", frame_slots=None, kv_frames=None,
                kv_out=None, layers=None, frame_lags=None):
        """x [B, C, F, H, W] latents of the pass; timesteps [B, F / block_frames] (0..1000) per block.

        Returns the head's tokens [B, F/pt * H/ph * W/pw, pt*ph*pw*C] (denoise_step un-patchifies
        them). With `cache`, the first `commit_frames` frames' K/V are committed to it.
        frame_slots: temporal slot of each frame (after the cache's slots; without a cache, its
        rotary position); default 0, 1, 2, ...
        frame_lags: with `cache`, per frame the oldest window frames it does not see (see
        temporal_attention): a speculative pass's later frames see the cache as the stream would.
        kv_frames, kv_out: the K/V (spatial rotary only) of these frames are appended to the list
        kv_out, one (k, v) per layer — to commit later (accepted drafts) or to recache.
        layers: run only the first `layers` blocks, then the head (a self-speculative drafter).
        """
        B, C, F, H, W = x.shape
        pt, ph, pw = self.cfg.patch_size
        grid = (F // pt, H // ph, W // pw)
        frame_tokens = grid[1] * grid[2]
        tokens = self.patch_embedding(x.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        blocks = F // block_frames
        if timesteps.shape != (B, blocks):
            raise ValueError(f"timesteps: expected shape [{B}, {blocks}] (one per block of {block_frames} frames), "
                             f"got {tuple(timesteps.shape)}")
        t_emb = self.time_embedding(sinusoidal_embedding(timesteps, self.cfg.freq_dim).to(tokens.dtype))
        e = self.time_projection(t_emb).unflatten(-1, (6, self.cfg.dim))  # [B, blocks, 6, dim]
        slots = list(range(F // pt)) if frame_slots is None else list(frame_slots)
        # one rotary table per pass, shared by every layer: spatial (what the cache stores), and
        # without a cache the temporal part by frame position
        rope = rope_table(grid, self.cfg.head_dim, temporal=False, device=tokens.device)
        rope_t = None if cache is not None else rope_table(grid, self.cfg.head_dim, frames=frame_slots, spatial=False,
                                                            device=tokens.device)
        pass_args = dict(cache=cache, layer=0, rope=rope, rope_t=rope_t,
                         block_tokens=block_frames * frame_tokens if blocks > 1 else None,
                         private_blocks=private_blocks if blocks > 1 else None, precision=precision,
                         backend=backend, commit_tokens=commit_frames * frame_tokens, frame_slots=slots,
                         frame_lags=frame_lags if cache is not None else None,
                         kv_tokens=[(f * frame_tokens, (f + 1) * frame_tokens) for f in (kv_frames or [])],
                         kv_out=kv_out if kv_frames else None)
        for i, block in enumerate(self.blocks[:layers]):
            pass_args["layer"] = i
            tokens = block(tokens, e, prompt_kv[i], pass_args)
        return self.head(tokens, t_emb)
