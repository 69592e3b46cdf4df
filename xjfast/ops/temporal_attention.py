"""temporal_attention: queries of the frames being generated attend to a cache of past frames
plus the pass itself, block-causal by frame, with Q/K/V in FP8 e4m3 and softmax in fp32.

The reference below defines the op (and is the CPU path). Quantization it simulates, which the
kernels reproduce:
- key units: each cache page (one frame), the keep buffer, and each block of the pass (each
  frame of it when a cache is given) is stored as K minus its own per-(head, channel) mean m;
  scores get q.m added back, which cancels the subtraction exactly;
- K per (unit, head) and V per (unit, head, channel) scales; Q per (64-token tile, head), after
  the temporal rotary of that key unit is applied to it;
- P = exp(s - rowmax) is multiplied by 448 before its cast to e4m3 and divided after the
  product, so small weights survive next to a dominant sink key; the row sum uses unrounded P.
"""
from __future__ import annotations

import numbers
import os
from collections.abc import Mapping, Set
from typing import NamedTuple, Sequence

import torch

from xjfast.backends import check_backend, heads_grid_reason, register, resolve, triton_interpreted
from xjfast.errors import check_choice, check_tensor, is_int
from xjfast.ops.fp8 import E4M3, P_SCALE, fake_quant, round_e4m3, scale_from_amax
from xjfast.ops.kv_cache_commit import quantize_unit
from xjfast.ops.constants import device_tuple
from xjfast.ops.rotary import rope_table, rotate_leading

PRECISIONS = ("fp8", "bf16")
HEAD_DIMS = (64, 128)
MAX_FRAME_SLOT = 1 << 16  # a pass's slots past the cache's (the rotary table grows with the largest)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
Q_TILE = 64  # query tokens per Q quantization block (the kernels' BLOCK_M)
KV_TILE = 64  # keys per step of the online softmax (the kernels' BLOCK_N): P is rounded per step
CUDA_KV_TILE = 64  # the CUDA kernel's step (csrc/temporal_attention.h: kAttentionBlockN)
# The attention mass (for keep_tokens) is summed in int64 fixed point with 32 fractional bits:
# each head's sum over the queries is rounded once, and integer sums do not depend on the order in
# which a GPU's atomics add the heads, so every run keeps the same tokens (fp32 atomics would not).
MASS_SCALE = 2.0 ** 32  # = csrc/temporal_attention.h: kMassScale
# (a head adds at most Lq per token, each query's weights summing to 1: int64 holds 2^31 query
# rows x heads x passes, where a page is weighed by a few passes before its eviction)


def mass_fixed(mass: torch.Tensor) -> torch.Tensor:
    """Attention mass (>= 0) -> the int64 fixed point the cache accumulates: x * 2^32 rounded to
    nearest, ties up, as the kernels round their fp32 sums."""
    return (mass.double() * MASS_SCALE + 0.5).floor().long()


def mass_values(mass: torch.Tensor) -> torch.Tensor:
    """The cache's int64 fixed-point attention mass -> fp32 (what kv_cache_compact ranks): the
    conversion rounds once, and the power-of-two scale is exact."""
    return mass.float() / MASS_SCALE


class AttentionPlan(NamedTuple):
    """Everything the backends need beyond q, k, v: validated, device-independent."""
    block_tokens: int            # tokens per mask block (Lq when no mask)
    private: tuple               # bool per block
    causal: bool                 # False: no mask inside the pass
    scale: float
    frame_tokens: int | None     # tokens per temporal slot of the pass (None: no rotary)
    precision: str
    frame_slots: tuple = ()      # slot of each frame of the pass, after the cache's slots
    frame_lags: tuple = ()       # per frame of the pass: window frames it does not see (empty: none)


def block_mask(num_tokens: int, block_tokens: int | None, private_blocks: Sequence[bool] | None = None,
               device=None) -> torch.Tensor:
    """The [Lq, Lq] boolean mask (True = may attend) of the pass, as DESIGN.md defines it."""
    if block_tokens is None:
        return torch.ones(num_tokens, num_tokens, dtype=torch.bool, device=device)
    block = torch.arange(num_tokens, device=device) // block_tokens
    visible = block[None, :] <= block[:, None]
    if private_blocks is not None:
        private = torch.as_tensor(list(private_blocks), dtype=torch.bool, device=device)[block]
        visible &= ~private[None, :] | (block[None, :] == block[:, None])
    return visible


def _scalars(values) -> list | None:
    """The elements of a sequence, tensor or array as Python scalars (numpy and 0-d tensor
    elements included), or None when `values` is no such sequence (a mapping or a set iterates
    over its keys, or in no fixed order: not one entry per block or frame)."""
    if isinstance(values, (str, bytes, Mapping, Set)):
        return None
    try:
        items = list(values.tolist() if hasattr(values, "tolist") else values)
    except TypeError:
        return None
    return [x.tolist() if hasattr(x, "tolist") else x for x in items]


def _ints(values, low: int, high: int) -> tuple | None:
    """The integers (bools excluded) of `values`, each in [low, high], or None."""
    items = _scalars(values)
    if items is None or not all(is_int(x) and low <= x <= high for x in items):
        return None
    return tuple(items)


def _validate(q, k, v, block_tokens, private_blocks, scale, kv_cache, layer, precision, backend, frame_slots=None,
              frame_lags=None):
    check_tensor("q", q, dtypes=DTYPES, ndim=4, unit_last_stride=True, nonempty=True)
    check_tensor("k", k, dtypes=(q.dtype,), ndim=4, device=q.device, unit_last_stride=True)
    check_tensor("v", v, dtypes=(q.dtype,), ndim=4, device=q.device, unit_last_stride=True)
    B, L, H, D = q.shape
    if D not in HEAD_DIMS:
        raise ValueError(f"q: expected head_dim in {HEAD_DIMS}, got {D} (shape {tuple(q.shape)})")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{name}: expected shape {tuple(q.shape)} (the keys of the query tokens "
                             f"themselves, like q), got {tuple(t.shape)}")
    check_choice("precision", precision, PRECISIONS)
    check_backend(backend)
    if scale is None:
        scale = D ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not scale > 0 or scale == float("inf"):
        raise ValueError(f"scale: expected a positive finite float, got {scale!r}")
    if block_tokens is not None:
        if not is_int(block_tokens) or block_tokens <= 0 or L % block_tokens:
            raise ValueError(f"block_tokens: expected a positive int dividing Lq={L}, got {block_tokens!r}")
    blocks = L // block_tokens if block_tokens else 1
    if private_blocks is None:
        private = (False,) * blocks
    else:
        if block_tokens is None:
            raise ValueError("private_blocks: needs block_tokens (private blocks are blocks of the mask)")
        flags = _scalars(private_blocks)
        if flags is None or not all(isinstance(p, (bool, int)) and p in (0, 1) for p in flags):
            raise ValueError(f"private_blocks: expected a sequence of bools (one per block), got {private_blocks!r}")
        private = tuple(bool(p) for p in flags)
        if len(private) != blocks:
            raise ValueError(f"private_blocks: expected {blocks} entries (one per block of {block_tokens} "
                             f"tokens), got {len(private)}")
    frame_tokens = None
    if kv_cache is not None:
        from xjfast.cache import StreamingKVCache
        if not isinstance(kv_cache, StreamingKVCache):
            raise TypeError(f"kv_cache: expected a StreamingKVCache, got {type(kv_cache).__name__}")
        geometry = (kv_cache.batch, kv_cache.heads, kv_cache.head_dim)
        if geometry != (B, H, D):
            raise ValueError(f"kv_cache: expected a cache of (batch, heads, head_dim) = {(B, H, D)} to match q, "
                             f"got {geometry}")
        if kv_cache.device != q.device:
            raise ValueError(f"kv_cache: expected a cache on {q.device} (q's device), got {kv_cache.device}")
        if layer is None:
            raise ValueError("layer: expected the layer index of kv_cache to read, got None")
        kv_cache._check_layer(layer)
        frame_tokens = kv_cache.frame_tokens
        if L % frame_tokens or (block_tokens and block_tokens % frame_tokens):
            raise ValueError(f"q: with kv_cache, Lq ({L}) and block_tokens ({block_tokens}) must be whole "
                             f"frames of {frame_tokens} tokens")
    elif layer is not None:
        raise ValueError("layer: given without kv_cache")
    slots = ()
    if frame_slots is not None:
        if kv_cache is None:
            raise ValueError("frame_slots: needs kv_cache (temporal positions are cache slots)")
        slots = _ints(frame_slots, 0, MAX_FRAME_SLOT - 1)
        if slots is None or len(slots) != L // frame_tokens:
            raise ValueError(f"frame_slots: expected {L // frame_tokens} ints in [0, {MAX_FRAME_SLOT}) (one per frame "
                             f"of the pass), got {_scalars(frame_slots) or frame_slots!r}")
    elif kv_cache is not None:
        slots = tuple(range(L // frame_tokens))
    lags = ()
    if frame_lags is not None:
        if kv_cache is None:
            raise ValueError("frame_lags: needs kv_cache (a lag hides the cache's oldest window frames)")
        held = kv_cache.num_frames(layer)
        window = held - min(held, kv_cache.sink_frames)  # the sinks fill first
        lags = _ints(frame_lags, 0, window)
        if lags is None or len(lags) != L // frame_tokens:
            raise ValueError(f"frame_lags: expected {L // frame_tokens} ints in [0, {window}] (one per frame of the "
                             f"pass, at most the window frames cached), got {_scalars(frame_lags) or frame_lags!r}")
        lags = lags if any(lags) else ()
    return AttentionPlan(block_tokens or L, private, block_tokens is not None, float(scale), frame_tokens,
                         precision, slots, lags)


def temporal_attention(q, k, v, *, block_tokens=None, private_blocks=None, scale=None, kv_cache=None,
                       layer=None, precision="fp8", return_lse=False, backend="auto", frame_slots=None,
                       frame_lags=None):
    """Attention of the pass's queries over `kv_cache[layer]` (oldest first) and the pass's own keys.

    q, k, v: [B, Lq, H, D], bf16/fp16 (fp32 on the reference), D in {64, 128}. With `kv_cache`,
    q and k carry their spatial rotary but not the temporal one: the op rotates by slot (cached
    frames take slots 0..n-1, frame f of the pass slot n+f, or n+frame_slots[f] when given: a
    speculative pass holds a draft and a noisy block of the same frame, which share a slot).
    frame_lags[f] = j: frame f's queries see the cache as it will be once j more frames have
    evicted the oldest: its j oldest window frames are hidden from them, and the sinks and the
    keep buffer are j slots nearer (the distance a stream that committed those j frames first
    would give them). A speculative pass's later frames take that view of the cache, so that
    they attend as the non-speculative stream does.
    Returns out [B, Lq, H, D] in q's dtype, and LSE [B, H, Lq] fp32 (natural log, of the scaled
    scores) if `return_lse`.
    """
    plan = _validate(q, k, v, block_tokens, private_blocks, scale, kv_cache, layer, precision, backend, frame_slots,
                     frame_lags)
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse: expected True or False, got {return_lse!r}")
    if kv_cache is None:  # a registered custom op: torch.compile and graph capture see one node
        out, lse = torch.ops.xjfast.temporal_attention(q, k, v, plan.block_tokens, list(plan.private), plan.causal,
                                                       plan.scale, plan.precision, backend)
    else:
        args = (q, k, v, plan, kv_cache.view(layer))
        out, lse = resolve("temporal_attention", backend, q.device, args).fn(*args)
    return (out, lse) if return_lse else out


# The ops' schemas are written out, the contract torch.compile and graph capture see (not inferred from
# this module's postponed annotations, which torch before 2.5 could not read).
@torch.library.custom_op("xjfast::temporal_attention", mutates_args=(), schema=(
    "(Tensor q, Tensor k, Tensor v, SymInt block_tokens, bool[] private, bool causal, float scale, str precision, "
    "str backend) -> (Tensor, Tensor)"))
def _temporal_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_tokens: int,
                           private: list[bool], causal: bool, scale: float, precision: str,
                           backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    args = (q, k, v, AttentionPlan(block_tokens, tuple(private), causal, scale, None, precision), None)
    return resolve("temporal_attention", backend, q.device, args).fn(*args)


@_temporal_attention_op.register_fake
def _(q, k, v, block_tokens, private, causal, scale, precision, backend):
    B, L, H, D = q.shape  # every backend returns a contiguous out, whatever q's strides
    return q.new_empty((B, L, H, D)), q.new_empty((B, H, L), dtype=torch.float32)


# ---- what the fast kernels read besides q, k, v ---------------------------------------------

class KernelTables(NamedTuple):
    """Small device tables a fast kernel reads, built once per value (graph-capture safe)."""
    slots: torch.Tensor      # int32 [units]: temporal slot of each unit of the pass, after first_slot
    lags: torch.Tensor       # int32 [units]: frame_lags (zeros without)
    private: torch.Tensor    # int8 [blocks]
    rope: torch.Tensor | None  # fp32 [2 * rope_center + 1, 2, D / 2] (None: no temporal rotary)
    rope_center: int
    rope_dims: int
    first_slot: int
    unit_tokens: int         # tokens per unit of the pass: a frame with a cache, a mask block without


def kernel_tables(plan: AttentionPlan, view, q: torch.Tensor) -> KernelTables:
    B, L, H, D = q.shape
    unit_tokens = plan.frame_tokens or plan.block_tokens
    n_units = L // unit_tokens
    slots = device_tuple(plan.frame_slots or tuple(range(n_units)), torch.int32, q.device)
    lags = device_tuple(plan.frame_lags or (0,) * n_units, torch.int32, q.device)
    private = device_tuple(plan.private, torch.int8, q.device)
    if view is None or view.rope_dims == 0:
        return KernelTables(slots, lags, private, None, 0, 0, 0 if view is None else view.num_slots, unit_tokens)
    # the largest |query slot - unit slot|: every slot of the cache plus the pass's own
    span = view.k_pages.shape[0] + 2 + max(plan.frame_slots, default=0) + n_units
    rope = rope_table(view.rope_dims, view.rope_theta, D, span, q.device)
    return KernelTables(slots, lags, private, rope, span, view.rope_dims, view.num_slots, unit_tokens)


def output_buffers(q: torch.Tensor, out: torch.Tensor | None = None, lse: torch.Tensor | None = None):
    """The launchers' out [B, L, H, D] (q's dtype, unit last stride) and lse [B, H, L] (fp32,
    contiguous): new, or the caller's checked (the kernels write through their pointers)."""
    B, L, H, D = q.shape
    return (_output_buffer("out", out, (B, L, H, D), q.dtype, q.device, contiguous=False),
            _output_buffer("lse", lse, (B, H, L), torch.float32, q.device, contiguous=True))


def _output_buffer(name: str, t, shape: tuple, dtype: torch.dtype, device: torch.device, contiguous: bool):
    if t is None:
        return torch.empty(shape, device=device, dtype=dtype)
    if (tuple(t.shape), t.dtype, t.device) != (shape, dtype, device) or t.stride(-1) != 1 or (
            contiguous and not t.is_contiguous()):
        raise ValueError(f"{name}: expected a {'contiguous ' if contiguous else ''}{dtype} tensor of shape "
                         f"{list(shape)} on {device} with unit last stride, got {t.dtype} {list(t.shape)} on "
                         f"{t.device} with strides {t.stride()}")
    return t


def pass_pages(k: torch.Tensor, v: torch.Tensor, unit_tokens: int, commit) -> tuple:
    """The pass's K/V [B, L, H, D] quantized once into the page format — (k, v) [U, B, unit_tokens,
    H, D] e4m3, k_scale [U, B, H], k_mean and v_scale [U, B, H, D] — by `commit`, a backend's
    kv_cache_commit implementation. Every query tile then reads them as e4m3 like cached pages,
    instead of requantizing them (and they take fewer bytes)."""
    B, L, H, D = k.shape
    units, dev = L // unit_tokens, k.device
    pages = [torch.empty(units, B, unit_tokens, H, D, device=dev, dtype=E4M3) for _ in range(2)]
    scales = [torch.empty(units, B, H, device=dev), torch.empty(units, B, H, D, device=dev),
              torch.empty(units, B, H, D, device=dev)]
    commit(k, v, *pages, *scales, torch.arange(units, device=dev, dtype=torch.int32))
    return (*pages, *scales)


# ---- reference -----------------------------------------------------------------------------

class _Unit(NamedTuple):
    k: torch.Tensor        # [B, n, H, D] fp32, K minus its mean (on its e4m3 grid in fp8 precision)
    mean: torch.Tensor     # [B, H, D] fp32
    v: torch.Tensor        # [B, n, H, D] fp32
    position: int | None   # temporal slot
    keys: slice | None     # this unit's columns in the pass (None for cached units)
    page: int | None       # cache page, for the attention-mass accumulator
    fp8: bool              # Q.K and P.V of this unit run in e4m3
    window: int | None = None  # its index in the cache's window (None: a sink, the keep buffer or the pass's)


def _dequantized(kq, vq, ks, km, vs):
    return kq.float() * ks[:, None, :, None], km, vq.float() * vs[:, None]


def _cached_units(view, fp8: bool) -> list[_Unit]:
    """Cached pages at their storage precision: e4m3 pages take part in FP8 precision as they
    are; bf16/fp32 pages are used unquantized (there is no FP8 grid to reuse)."""
    from xjfast.cache import KEEP
    units = []
    first_window = len(view.units) - (view.page_table.numel() - view.num_sinks)
    for index, unit in enumerate(view.units):
        if unit.page == KEEP:
            stored = (view.keep_k[:, :unit.tokens], view.keep_v[:, :unit.tokens], view.keep_k_scale,
                      view.keep_k_mean, view.keep_v_scale)
        else:
            p = unit.page
            stored = (view.k_pages[p], view.v_pages[p], view.k_scale[p], view.k_mean[p], view.v_scale[p])
        units.append(_Unit(*_dequantized(*stored), unit.position, None, None if unit.page == KEEP else unit.page,
                           fp8 and view.storage == "fp8", index - first_window if index >= first_window else None))
    return units


def _pass_units(k, v, plan, first_slot) -> list[_Unit]:
    size = plan.frame_tokens or plan.block_tokens
    fp8 = plan.precision == "fp8"
    units = []
    for i, start in enumerate(range(0, k.shape[1], size)):
        keys = slice(start, start + size)
        if fp8:
            kc, mean, vf = _dequantized(*quantize_unit(k[:, keys], v[:, keys], E4M3))
        else:
            kf, vf = k[:, keys].float(), v[:, keys].float()
            mean = kf.mean(dim=1)
            kc = kf - mean[:, None]
        units.append(_Unit(kc, mean, vf, first_slot + plan.frame_slots[i] if plan.frame_tokens else None, keys,
                           None, fp8))
    return units


def _quantize_q(qr: torch.Tensor) -> torch.Tensor:
    """Fake-quantize q [B, L, H, D] per (Q_TILE tokens, head)."""
    B, L, H, D = qr.shape
    pad = -L % Q_TILE
    tiles = torch.nn.functional.pad(qr, (0, 0, 0, 0, 0, pad)).view(B, -1, Q_TILE, H, D)
    scale = scale_from_amax(tiles.abs().amax(dim=(2, 4), keepdim=True))
    return fake_quant(tiles, scale).view(B, L + pad, H, D)[:, :L]


# Scores the reference holds at once (a row chunk's [B, H, rows, keys] fp32; its softmax holds a few
# such): at the stream shape the whole pass's scores are 5.4 GB, 22 GB at the peak
REFERENCE_SCORE_BYTES = 256 * 2 ** 20


@register("temporal_attention", "reference")
def temporal_attention_reference(q, k, v, plan: AttentionPlan, view, kv_tile: int = KV_TILE, kv_splits: int = 1):
    """The definition; `kv_tile` is the online softmax's step whose P rounding is simulated (a
    backend's BLOCK_N, when holding that backend to the reference that simulates it), and
    `kv_splits` the number of ways a backend splits the key units (slot order, ceil(units /
    kv_splits) each), every split running its own online softmax. Rows are independent: they are
    attended in chunks of whole Q tiles, so that memory stays bounded at any shape."""
    B, L, H, D = q.shape
    first_slot = view.num_slots if view is not None else 0
    units = (_cached_units(view, plan.precision == "fp8") if view is not None else []) + \
        _pass_units(k, v, plan, first_slot)
    qf = q.float()
    q_pos = q_lag = None
    if plan.frame_tokens:
        frame_of = torch.arange(L, device=q.device) // plan.frame_tokens
        q_pos = first_slot + torch.tensor(plan.frame_slots, device=q.device)[frame_of]
        q_lag = torch.tensor(plan.frame_lags or (0,) * len(plan.frame_slots), device=q.device)[frame_of]
    visible = block_mask(L, plan.block_tokens, plan.private, q.device) if plan.causal else None
    keys = sum(u.k.shape[1] for u in units)
    rows = max(1, REFERENCE_SCORE_BYTES // (4 * B * H * keys * Q_TILE)) * Q_TILE
    out = torch.empty(B, L, H, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, L, dtype=torch.float32, device=q.device)
    for r0 in range(0, L, rows):
        r = slice(r0, r0 + rows)
        out[:, r], lse[:, :, r] = _attend_rows(
            qf[:, r], q.dtype, units, plan, view, None if q_pos is None else q_pos[r], None if q_lag is None else q_lag[r],
            None if visible is None else visible[r], kv_tile, kv_splits)
    return out, lse


def _attend_rows(qf, q_dtype, units, plan: AttentionPlan, view, q_pos, q_lag, visible, kv_tile: int,
                 kv_splits: int):
    """temporal_attention_reference for a chunk of query rows (whole Q tiles): their output, LSE,
    and their attention mass added to the view's."""
    B, L, H, D = qf.shape
    rope_dims, theta = (view.rope_dims, view.rope_theta) if view is not None else (0, 0.0)
    scores = []
    for unit in units:
        anchored = unit.keys is None and unit.window is None  # a sink or the keep buffer: nearer by the lag
        delta = None if unit.position is None else q_pos - unit.position - (q_lag if anchored else 0)
        qr = qf if delta is None else rotate_leading(qf, delta, rope_dims, theta)
        # a 16-bit unit's scores: the rotated query in q's dtype (as a 16-bit dot takes it) with the whole K
        if not unit.fp8:
            qr = qr.to(q_dtype).float()
        s = torch.einsum("blhd,bnhd->bhln", _quantize_q(qr) if unit.fp8 else qr, unit.k)
        s = (s + torch.einsum("blhd,bhd->bhl", qr, unit.mean)[..., None]) * plan.scale
        if unit.keys is not None and visible is not None:
            s = s.masked_fill(~visible[:, unit.keys], float("-inf"))
        if unit.window is not None and plan.frame_lags:  # hidden from the rows that lag past it
            s = s.masked_fill((q_lag > unit.window)[:, None], float("-inf"))
        scores.append(s)
    s = torch.cat(scores, dim=-1)
    row_max = s.amax(dim=-1, keepdim=True)
    p = torch.exp(s - row_max)
    del s
    row_sum = p.sum(dim=-1, keepdim=True)
    out = torch.zeros(B, H, L, D, device=qf.device)
    sizes = [u.k.shape[1] for u in units]
    running = _running_max(scores, row_max, kv_tile, -(-len(units) // kv_splits))
    for unit, s_unit, p_unit, m_run in zip(units, scores, p.split(sizes, dim=-1), running.split(sizes, dim=-1)):
        if unit.fp8:  # P is rounded relative to the running max of the online softmax, then rescaled
            # (from the scores: p / exp(m_run - row_max) would be 0 / 0 where that factor underflows)
            p_unit = round_e4m3(torch.exp(s_unit - m_run) * P_SCALE) / P_SCALE * torch.exp(m_run - row_max)
        out += torch.einsum("bhln,bnhd->bhld", p_unit, unit.v)
    out = (out / row_sum).transpose(1, 2)
    lse = (row_max + row_sum.log()).squeeze(-1)
    if view is not None and view.mass is not None:
        _accumulate_mass(view, units, p / row_sum)
    return out, lse


def _running_max(scores: list, row_max: torch.Tensor, kv_tile: int, split_units: int) -> torch.Tensor:
    """Per key: the online softmax's running row max once that key's kv_tile-key tile is read
    (units in slot order, each tiled from its start; a split of split_units units starts its own
    softmax), as the kernels see it."""
    tile_max, tile_len = [], []
    for s in scores:
        n = s.shape[-1]
        padded = torch.nn.functional.pad(s, (0, -n % kv_tile), value=float("-inf"))
        tile_max.append(padded.unflatten(-1, (-1, kv_tile)).amax(dim=-1))
        tile_len += [min(kv_tile, n - i) for i in range(0, n, kv_tile)]
    running = torch.cat([torch.cat(tile_max[i:i + split_units], dim=-1).cummax(dim=-1).values
                         for i in range(0, len(tile_max), split_units)], dim=-1)
    running = torch.where(running == float("-inf"), row_max, running)  # rows that saw nothing yet
    lengths = torch.tensor(tile_len, device=running.device)
    return running.repeat_interleave(lengths, dim=-1)


def _accumulate_mass(view, units, probs) -> None:
    """Add the attention mass (per head summed over queries, rounded to fixed point, then summed
    over heads) of the next pages to evict."""
    start = 0
    for unit in units:
        n = unit.k.shape[1]
        if unit.page is not None and unit.page in view.mass_pages:
            view.mass[unit.page] += mass_fixed(probs[..., start:start + n].sum(dim=2)).sum(dim=1)
        start += n


def _triton_supports(q, k, v, plan: AttentionPlan, view) -> str | None:
    return heads_grid_reason("Triton", q.shape[0], q.shape[2])


@register("temporal_attention", "triton", min_capability=(8, 9), supports=_triton_supports)
def temporal_attention_triton(q, k, v, plan: AttentionPlan, view):
    from xjfast.kernels.temporal_attention import temporal_attention as launch
    return launch(q, k, v, plan, view, interpret=triton_interpreted())


def _cuda_supports(q, k, v, plan: AttentionPlan, view) -> str | None:
    from xjfast.ops._cuda import shared_memory_reason
    if reason := heads_grid_reason("CUDA", q.shape[0], q.shape[2]):
        return reason
    if reason := shared_memory_reason(q.device):  # the pass's K/V go through the CUDA commit kernel
        return f"it quantizes the pass with the CUDA commit kernel: {reason}"
    if plan.precision != "fp8":
        return f"the CUDA kernel implements precision='fp8' (got {plan.precision!r}; backend='triton' runs it)"
    if view is not None and view.storage != "fp8":
        return f"the CUDA kernel reads e4m3 cache pages (this cache stores {view.storage!r}; backend='triton' reads it)"
    if reason := forced_core_reason(q.device):
        return reason
    if q.device.type == "cuda" and skipped_cuda_paths() and cuda_core(q.device) is None:
        return (f"XJFAST_CUDA_ATTENTION_SKIP leaves out every CUDA attention path this GPU runs "
                f"({', '.join(cuda_paths(q.device))})")
    return None


CUDA_CORES = ("auto", "mma", "wgmma", "ws")
CUDA_CORE_RANKING = "temporal_attention:cuda_core"  # its entry in backend_ranking.json
CONFIG_RANKING = "temporal_attention:triton_config"  # the Triton kernel's configurations, ranked likewise
SPLITS_ENV = "XJFAST_TRITON_ATTENTION_SPLITS"  # n: the Triton kernel splits the key units n ways
CONFIG_ENV = "XJFAST_TRITON_ATTENTION_CONFIG"  # "BLOCK_M,BLOCK_N,warps,stages": the Triton kernel runs that one


def cuda_paths(device: torch.device | str) -> list[str]:
    """The CUDA attention's paths a GPU runs, in auto's order without a ranking: on sm_90, with
    xjfast._C built for sm_90a, wgmma, ws (the warp-specialized TMA + wgmma kernel,
    csrc/temporal_attention_ws.cu) and mma; elsewhere mma (mma.sync: a plain sm_90 build has no
    wgmma)."""
    from xjfast import _ext
    hopper = torch.cuda.get_device_capability(device) == (9, 0) and "90a" in _ext.built_archs()
    return ["wgmma", "ws", "mma"] if hopper else ["mma"]


def forced_core() -> str | None:
    """The path XJFAST_CUDA_ATTENTION_CORE forces (checked), or None."""
    core = os.environ.get("XJFAST_CUDA_ATTENTION_CORE")
    if core is not None:
        check_choice("XJFAST_CUDA_ATTENTION_CORE", core, CUDA_CORES)
    return core


def forced_core_reason(device: torch.device) -> str | None:
    """Why a CUDA `device` cannot run the path XJFAST_CUDA_ATTENTION_CORE forces (wgmma and ws are
    Hopper's), or None: so auto goes elsewhere, and backend='cuda' says why, before the launch."""
    core = forced_core()
    if device.type != "cuda" or core is None:
        return None
    paths = cuda_paths(device)
    if core == "auto" or core in paths:
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return (f"XJFAST_CUDA_ATTENTION_CORE={core} runs on sm_90 only, with xjfast._C built for sm_90a; "
            f"this GPU (sm_{major}{minor}) runs {', '.join(paths)}")


def skipped_cuda_paths() -> set[str]:
    """XJFAST_CUDA_ATTENTION_SKIP: comma-separated paths never to run (bench/gpu_check.sh sets it for
    a path whose first launch hung or failed, so the rest of the check runs without it)."""
    names = {n.strip() for n in os.environ.get("XJFAST_CUDA_ATTENTION_SKIP", "").split(",") if n.strip()}
    for name in names:
        check_choice("XJFAST_CUDA_ATTENTION_SKIP", name, CUDA_CORES[1:])
    return names


def cuda_core(device: torch.device | str | None = None) -> str | None:
    """The CUDA attention path to run: XJFAST_CUDA_ATTENTION_CORE when set (so benchmarks and tests
    can run each), else for a CUDA `device` the fastest of its cuda_paths() that the committed
    benchmark results rank for its compute capability (backend_ranking.json), else the first, less
    skipped_cuda_paths() (None: none left); "auto" (the extension's own choice) without a device."""
    from xjfast.backends import ranking
    core = forced_core()
    if core is not None:
        return core
    if device is None or torch.device(device).type != "cuda":
        return "auto"
    skipped = skipped_cuda_paths()
    runnable = [p for p in cuda_paths(device) if p not in skipped]
    major, minor = torch.cuda.get_device_capability(device)
    entry = ranking().get(CUDA_CORE_RANKING, {}).get(f"{major}.{minor}")
    ranked = [p for p in entry["order"] if p in runnable] if entry else []
    return (ranked + runnable + [None])[0]


# sm_90: the pass's K/V are quantized by the CUDA commit kernel, which runs thread-block clusters.
@register("temporal_attention", "cuda", min_capability=(9, 0), supports=_cuda_supports)
def temporal_attention_cuda(q, k, v, plan: AttentionPlan, view, *, out=None, lse=None, core=None):
    """csrc/temporal_attention.cu; `out`/`lse` as the Triton launcher takes them; `core` one of
    CUDA_CORES (default: cuda_core(q.device))."""
    from xjfast.ops._cuda import DTYPE_CODES, aligned_16, extension, stream_handle
    from xjfast.ops.kv_cache_commit import kv_cache_commit_cuda

    B, L, H, D = q.shape
    # rows are read 16 bytes at a time (q here, k and v by the commit kernel)
    q, k, v = (t if aligned_16(t) else t.clone(memory_format=torch.contiguous_format) for t in (q, k, v))
    out, lse = output_buffers(q, out, lse)
    tables = kernel_tables(plan, view, q)
    units = pass_pages(k, v, tables.unit_tokens, kv_cache_commit_cuda)
    ptrs = lambda *ts: [t.data_ptr() for t in ts]  # noqa: E731
    none = [0] * 5
    rope = (tables.rope.data_ptr() if tables.rope is not None else 0, tables.rope_center, tables.rope_dims)
    query = dict(q=q.data_ptr(), q_strides=list(q.stride()[:3]), dtype=DTYPE_CODES[q.dtype], sizes=[B, H, L, D])
    shared = dict(unit_tokens=tables.unit_tokens, frame_slots=tables.slots.data_ptr(),
                  frame_lags=tables.lags.data_ptr() if plan.frame_lags else 0, first_slot=tables.first_slot,
                  sm_scale_log2=plan.scale * 1.4426950408889634, rope=rope[0], rope_center=rope[1],
                  rope_dims=rope[2], stream=stream_handle(q.device))
    if view is not None:
        cache = ptrs(view.k_pages, view.v_pages, view.k_scale, view.k_mean, view.v_scale)
        keep = ptrs(view.keep_k, view.keep_v, view.keep_k_scale, view.keep_k_mean, view.keep_v_scale)
        cached = dict(cache=cache, cache_tokens=view.k_pages.shape[2], cache_pages=view.k_pages.shape[0],
                      page_table=view.page_table.data_ptr(), n_pages=view.page_table.numel(), n_sinks=view.num_sinks,
                      keep=keep, keep_capacity=max(view.keep_k.shape[1], 1), keep_count=view.keep_count)
    else:
        cached = dict(cache=none, cache_tokens=1, cache_pages=0, page_table=0, n_pages=0, n_sinks=0, keep=none,
                      keep_capacity=1, keep_count=0)
    ext = extension()
    shared["core"] = ext.attention_cores[core or cuda_core(q.device)]
    ext.temporal_attention(**query, out=out.data_ptr(), out_strides=list(out.stride()[:3]), lse=lse.data_ptr(),
                           **cached, pass_units=ptrs(*units), n_units=L // tables.unit_tokens,
                           private_blocks=tables.private.data_ptr(), block_tokens=plan.block_tokens,
                           causal=plan.causal, **shared)
    if view is not None and view.mass is not None:
        for table_index, slot in view.mass_units:
            ext.attention_mass(**query, lse=lse.data_ptr(), cache=cached["cache"], cache_tokens=view.k_pages.shape[2],
                               page_table=cached["page_table"], table_index=table_index, slot=slot,
                               window=table_index - view.num_sinks,
                               mass=view.mass.data_ptr(), **shared)
    return out, lse
