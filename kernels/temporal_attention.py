"""Triton temporal_attention: FP8 attention over a paged KV cache plus the pass's own keys.

One program per (BLOCK_M-query tile, batch*head, split of the key units: see kv_splits). It walks
its key units in slot order: the cached pages through the page table (e4m3, read as stored), the
keep buffer, then the pass's frames
(quantized beforehand by the kv_cache_commit kernel into a workspace of the same page format,
so every query tile reads them as e4m3 instead of requantizing them). Per unit it:
  1. rotates the query tile's temporal channels by (query slot - unit slot): the cached keys
     carry no temporal rotary, so the rotation moves to the query side and keys stay untouched;
  2. quantizes that rotated tile to e4m3 with one scale per 64 rows (per head and unit);
  3. adds q.mean back per row (each unit stores K minus its mean: exact, see DESIGN.md);
  4. runs an exp2 online softmax over the unit's key tiles, with P multiplied by 448 before
     its e4m3 cast and V's per-channel scale applied to the P.V product.
Units no row of the tile may see (block-causal / private masks) are skipped whole. With several
splits a combine kernel merges their outputs by LSE; a companion kernel turns the LSE into the
attention mass of the pages next to be evicted.
"""

import functools
import os

import torch
import triton
import triton.language as tl

from xjfast.ops.temporal_attention import CONFIG_ENV, CONFIG_RANKING, MASS_SCALE, SPLITS_ENV

from .fp8 import LOG2_P_SCALE, P_SCALE, scale_from_amax, to_e4m3
from .kv_cache_commit import kv_cache_commit
from .launch import launch

Q_TILE = 64  # = xjfast.ops.temporal_attention.Q_TILE: Q is quantized per 64-row group
_Q_TILE = tl.constexpr(Q_TILE)  # for jitted code
_MASS_SCALE = tl.constexpr(MASS_SCALE)
LOG2E = 1.4426950408889634
_LOG2E = tl.constexpr(LOG2E)

# Configurations (BLOCK_M, BLOCK_N, warps, stages). BLOCK_M is a multiple of Q_TILE; BLOCK_N is
# also the online softmax's step, so the reference simulates the same P rounding with
# kv_tile=BLOCK_N. Per target, the candidates the benchmark times side by side at the stream
# shape (each compiles without spills: tests/test_sass.py); a GPU runs the fastest that the
# committed results rank for its compute capability (backend_ranking.json), else the first.
# On sm_90 a 64-row tile at 8 warps (two warpgroups) has each warpgroup compute the whole S
# tile and its softmax for half of P.V's columns: twice the exp2 and 1.5x the MMA work of one
# warpgroup (per thread per 64 keys: 34 MUFU either way, over 256 threads instead of 128), so
# 4-warp tiles come first, two CTAs per SM hiding each other's loads. FP8 P.V is summed per tile
# from zero and added to the output in fp32 (_attend_tile), which holds a second 64 x 128 fp32
# tile in registers: at 4 warps only 32-key tiles with one stage stay spill-free under Triton 3.6
# (64-key tiles, or a second stage, spill 8-24 bytes), so sm_90 runs 32-key steps (277 SASS
# instructions per thread each) and keeps the 8-warp 64-key tile for the benchmark to weigh;
# 128-row tiles would split the rows but spill at head_dim 128. On sm_100 (tcgen05,
# accumulators in tensor memory) the warpgroups split the S tile. Ada (sm_89) runs FP8 mma.sync
# with the accumulators in registers: there every 4-warp tile spilled (40-300 bytes, inside the
# key loop too), 128-row 8-warp tiles spill under Triton 3.6 (32-80 bytes), and 64-row 8-warp
# tiles compile without spills under 3.6 and 3.9 but exponentiate each score 1.5-2 times (the
# warps split the columns). Consumer Blackwell (sm_120) takes sm_100's candidates, alike there.
# `python -m xjfast.tools.sass` shows instructions and exp2 per thread per key step.
CANDIDATES = {
    "sm_89": ((64, 64, 8, 1), (64, 32, 8, 1)),
    "sm_90": ((64, 32, 4, 1), (64, 64, 8, 2)),
    "sm_100": ((64, 64, 8, 1), (64, 32, 8, 1)),
}
# The tile of every 16-bit launch (see precision_config) where precision_config's rule spills
# most: on sm_89 128 rows at 8 warps with 32-key steps (bf16 precision spills nothing, FP8 over a
# bf16-stored cache 8-16 bytes, where the rule's 64-row tiles spilled 96-184). On sm_120 every
# tile tried spills in 16-bit launches (88-320 bytes): it keeps the rule.
SIXTEEN_BIT_CONFIG = {"sm_89": (128, 32, 8, 1)}
INTERPRET_CONFIG = (64, 64, 4, 1)


def config_name(cfg) -> str:
    return ",".join(map(str, cfg))


def parse_config(text: str) -> tuple[int, int, int, int]:
    try:
        cfg = tuple(int(x) for x in text.split(","))
    except ValueError:
        cfg = ()
    if len(cfg) != 4 or cfg[0] not in (64, 128) or cfg[1] not in (32, 64, 128) or cfg[2] not in (4, 8) \
            or not 1 <= cfg[3] <= 4:  # an FP8 dot takes K >= 32: P.V's K is BLOCK_N
        raise ValueError(f"{CONFIG_ENV}: expected 'BLOCK_M,BLOCK_N,warps,stages' with BLOCK_M in 64, 128, BLOCK_N in "
                         f"32, 64, 128, warps 4 or 8 and 1 to 4 stages, got {text!r}")
    return cfg


def target(capability: tuple[int, int]) -> str:
    """The tuning target of a GPU: sm_89 (Ada; the Triton kernels need FP8, 8.9 and up), sm_90
    (Hopper) or sm_100 (Blackwell, 10.x and up)."""
    major = capability[0]
    return "sm_100" if major >= 10 else "sm_90" if major == 9 else "sm_89"


def ranked_config(capability: tuple[int, int], ranking: dict) -> tuple[int, int, int, int]:
    """The fastest candidate of `capability`'s target that `ranking` (backend_ranking.json's
    contents) orders for it, else the target's first candidate."""
    candidates = CANDIDATES[target(capability)]
    entry = ranking.get(CONFIG_RANKING, {}).get(f"{capability[0]}.{capability[1]}")
    order = entry["order"] if entry else []  # names of configurations; others (no longer candidates) pass
    ranked = sorted((c for c in candidates if config_name(c) in order), key=lambda c: order.index(config_name(c)))
    return (ranked + list(candidates))[0]


@functools.lru_cache(maxsize=None)
def _gpu_config(capability: tuple[int, int]) -> tuple[int, int, int, int]:
    from xjfast.backends import ranking
    return ranked_config(capability, ranking())


def precision_config(cfg: tuple[int, int, int, int], all_fp8: bool,
                     target_name: str = "sm_90") -> tuple[int, int, int, int]:
    """The configuration a GPU of `target_name` runs where some key units are 16-bit (precision
    "bf16", or a cache stored in bf16): their K/V tiles are twice FP8's bytes, and at 4 warps a
    64-key tile or a second stage spilled, so those launches take 32 keys and one stage there. At
    8 warps they take 64 keys: for sm_100's 32-key tile (64,32,8,1) ptxas (Triton 3.6) allotted
    128 registers and spilled inside the key loop at head_dim 64 over a bf16-stored cache. On
    sm_89, SIXTEEN_BIT_CONFIG."""
    block_m, block_n, warps, stages = cfg
    if all_fp8:
        return cfg
    if target_name in SIXTEEN_BIT_CONFIG:
        return SIXTEEN_BIT_CONFIG[target_name]
    return (block_m, 32, warps, 1) if warps == 4 else (block_m, max(block_n, 64), warps, stages)


def hopper_paths(capability: tuple[int, int] | None) -> bool:
    """The kernel's HOPPER constexpr for a GPU of `capability` (None: the interpreter, which runs
    the Hopper paths so that CI tests them). On sm_90 the accumulators live in registers and FP8
    wgmma takes V only K-major: from plain row loads Triton transposes each V tile into shared
    memory one byte at a time (64 STS.U8 per thread per 64 keys), so V comes as four interleaved
    key sets, each thread then holding four consecutive keys of its channels (16 32-bit stores).
    sm_100's MMA reads V as it lies; there the four loads only cost registers (it spilled). Ada
    (sm_89) takes sm_90's paths: its FP8 mma.sync also takes V K-major, into registers, and keeps
    13 mantissa bits of its accumulator as Hopper does (two-level accumulation). Consumer
    Blackwell (sm_120) takes sm_100's: its FP8 mma.sync accumulates in fp32 (SageAttention runs
    it with pv_accum_dtype="fp32" there), and compiled so it neither spills nor stores bytes."""
    return capability is None or target(capability) in ("sm_89", "sm_90")


def ctas_per_sm(warps: int) -> int:
    """Programs of the attention one SM holds at once: every candidate uses 229-255 registers a
    thread (`python -m xjfast.tools.sass`; tests/test_sass.py holds this to the SASS), so two
    4-warp programs fit the 64K registers of an sm_90/sm_100 SM, one 8-warp."""
    return 2 if warps == 4 else 1


MAX_SPLITS = 8
COMBINE_ROWS = 32  # query rows per program of the combine kernel


def kv_splits(programs: int, units: int, slots: int) -> int:
    """How many ways to split the key units between programs, from `programs` = query tiles x
    batch x heads and the `slots` the GPU runs at once (SMs x ctas_per_sm): equal programs run in
    waves, and 300 programs on 264 slots take two waves for 1.14 waves of work (at the stream
    shape with one query frame: 25 tiles x 12 heads on an H100). Splitting trades that idle tail
    for a combine pass: the fewest splits (at most MAX_SPLITS, each at least one unit) within 10%
    of the best wave efficiency, counting the combine as 3% of the work per extra split."""
    def cost(n):  # the run time of the waves per program's work, plus the combine
        return triton.cdiv(programs * n, slots) / n * (1 + 0.03 * (n - 1))
    choices = range(1, max(1, min(MAX_SPLITS, units)) + 1)
    best = min(cost(n) for n in choices)
    return next(n for n in choices if cost(n) <= 1.1 * best)


def launch_config(q, plan, view, interpret: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, warps, stages) of a launch: config(), with precision_config on a GPU."""
    cfg = config(q.device, interpret)
    all_fp8 = plan.precision == "fp8" and (view is None or view.storage == "fp8")
    if interpret:
        return cfg
    gpu = target(torch.cuda.get_device_capability(q.device)) if q.device.type == "cuda" else "sm_90"
    return precision_config(cfg, all_fp8, gpu)


def split_plan(q, plan, view, interpret: bool) -> tuple[int, int]:
    """(splits, units per split) of a launch: XJFAST_TRITON_ATTENTION_SPLITS when set (the
    interpreter's tests run it), else kv_splits on a GPU, else 1; no split is left empty."""
    B, L, H, _ = q.shape
    units = L // (plan.frame_tokens or plan.block_tokens)
    if view is not None:
        units += view.page_table.numel() + (1 if view.keep_count > 0 else 0)
    forced = os.environ.get(SPLITS_ENV)
    if forced:
        if not forced.isdigit() or int(forced) < 1:
            raise ValueError(f"{SPLITS_ENV}: expected a positive integer, got {forced!r}")
        splits = int(forced)
    elif interpret or q.device.type != "cuda":
        splits = 1
    else:
        from .kv_cache_commit import sm_count
        block_m, _, warps, _ = launch_config(q, plan, view, interpret)  # as launched
        splits = kv_splits(triton.cdiv(L, block_m) * B * H, units, sm_count(q.device) * ctas_per_sm(warps))
    split_units = triton.cdiv(units, min(splits, units))
    return triton.cdiv(units, split_units), split_units


def config(device, interpret: bool) -> tuple[int, int, int, int]:
    forced = os.environ.get(CONFIG_ENV)
    if forced:
        return parse_config(forced)
    if interpret or device.type != "cuda":
        return INTERPRET_CONFIG
    return _gpu_config(torch.cuda.get_device_capability(device))


@triton.jit
def _rotate(q, delta, rope_ptr, rope_center, first_pair, D: tl.constexpr):
    """Rotate channel pairs (2j, 2j+1) of each row of q [M, C] (channels first_pair * 2 onwards of
    a head) by its slot difference `delta`, with cos and sin read from a [deltas, 2, D/2] table
    (identity past the temporal channels): a gather costs far fewer registers and instructions
    than cos/sin of the tile."""
    M: tl.constexpr = q.shape[0]
    C: tl.constexpr = q.shape[1]
    offs_j = first_pair + tl.arange(0, C // 2)
    trig = rope_ptr + (delta + rope_center)[:, None].to(tl.int64) * D + offs_j[None, :]
    cos = tl.load(trig)
    sin = tl.load(trig + D // 2)
    even, odd = tl.split(tl.reshape(q, [M, C // 2, 2]))
    return tl.reshape(tl.join(even * cos - odd * sin, even * sin + odd * cos), [M, C])


@triton.jit
def _halves(x):
    """x [D] -> (x[:D/2], x[D/2:])."""
    D: tl.constexpr = x.shape[0]
    return tl.split(tl.permute(tl.reshape(x, [2, D // 2]), [1, 0]))


@triton.jit
def _query(q_rows, rows, delta, k_mean, sm_scale_log2, rope_ptr, rope_center,
           D: tl.constexpr, ROPE_DIMS: tl.constexpr, FP8: tl.constexpr, DT: tl.constexpr, INTERPRET: tl.constexpr):
    """The query tile as the dots take it, for one key unit: rotated by `delta` (temporal rotary),
    in e4m3 with one scale per Q_TILE rows (FP8), else in DT; each row's scale ([M], 1 without
    FP8) and its mean term q.k_mean * sm_scale_log2 [M] (FP8: of the fp32 rotated q, which the
    smoothing adds back exactly; 16-bit: of the DT operand, so that the unit's scores are those of
    q in DT with the whole K, however K is split into its mean and the rest). At head_dim 128 the
    tile comes as two halves (lo, hi) of 64 channels, which keeps the fp32 tile and the rotation's
    tables at half the registers (what lets a 4-warp tile run without spills): the temporal
    channels come first (Wan: 44 of 128), so only lo turns unless ROPE_DIMS > 64. At head_dim 64,
    lo is the whole tile and hi repeats it. The tile is re-read per unit (a cache hit) rather than
    held in registers across the key loop, where the accumulator needs them: the loads are
    volatile, or the compiler hoists them out of the loops over units and keeps the tile live (it
    spilled so)."""
    if D > 64:
        HALF: tl.constexpr = D // 2
        offs_h = tl.arange(0, HALF)
        lo = tl.load(q_rows + offs_h[None, :], mask=rows[:, None], other=0.0, volatile=True).to(tl.float32)
        hi = tl.load(q_rows + HALF + offs_h[None, :], mask=rows[:, None], other=0.0, volatile=True).to(tl.float32)
        if ROPE_DIMS > 0:
            lo = _rotate(lo, delta, rope_ptr, rope_center, 0, D)
        if ROPE_DIMS > HALF:
            hi = _rotate(hi, delta, rope_ptr, rope_center, HALF // 2, D)
    else:
        lo = tl.load(q_rows + tl.arange(0, D)[None, :], mask=rows[:, None], other=0.0, volatile=True).to(tl.float32)
        if ROPE_DIMS > 0:
            lo = _rotate(lo, delta, rope_ptr, rope_center, 0, D)
        hi = lo
    if FP8:
        q_mean = _mean_term(lo, hi, k_mean, sm_scale_log2, D)
        M: tl.constexpr = lo.shape[0]
        row_amax = tl.maximum(tl.max(tl.abs(lo), axis=1), tl.max(tl.abs(hi), axis=1))
        if M == _Q_TILE:
            amax = tl.max(row_amax, axis=0) + tl.zeros_like(row_amax)
        else:
            group_amax = tl.max(tl.reshape(row_amax, [M // _Q_TILE, _Q_TILE]), axis=1)
            amax = tl.reshape(tl.broadcast_to(group_amax[:, None], [M // _Q_TILE, _Q_TILE]), [M])
        scale = scale_from_amax(amax)
        return (to_e4m3(lo / scale[:, None], INTERPRET), to_e4m3(hi / scale[:, None], INTERPRET), scale, q_mean)
    else:  # a constexpr else: only one return compiles (their tiles' types differ)
        lo, hi = _operand(lo, DT, INTERPRET), _operand(hi, DT, INTERPRET)
        q_mean = _mean_term(lo.to(tl.float32), hi.to(tl.float32), k_mean, sm_scale_log2, D)
        return lo, hi, tl.zeros_like(q_mean) + 1.0, q_mean


@triton.jit
def _mean_term(lo, hi, k_mean, sm_scale_log2, D: tl.constexpr):
    """q.k_mean * sm_scale_log2 per row, from the query tile's halves (at head_dim 64, lo alone)."""
    if D > 64:
        mean_lo, mean_hi = _halves(k_mean)
        return (tl.sum(lo * mean_lo[None, :], axis=1) + tl.sum(hi * mean_hi[None, :], axis=1)) * sm_scale_log2
    else:
        return tl.sum(lo * k_mean[None, :], axis=1) * sm_scale_log2


@triton.jit
def _operand(x, DT: tl.constexpr, INTERPRET: tl.constexpr):
    """An fp32 tile as a 16-bit dot operand: in DT on a GPU. The interpreter's bf16 dot is broken
    and its fp32 -> bf16 cast truncates: there, the tile is rounded to DT's grid (to nearest even,
    as the GPU's cast) and kept in fp32."""
    if INTERPRET:  # constexpr branches: only the taken one compiles, so each may return its type
        if DT == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            y = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        else:
            y = x.to(DT).to(tl.float32)
    else:
        y = x.to(DT)
    return y


@triton.jit
def _load_rows(rows_ptr, offs_c, live, MASKED: tl.constexpr):
    """[N, C] at rows_ptr[:, None] + offs_c[None, :]; with MASKED only the rows `live` (else 0)."""
    if MASKED:
        return tl.load(rows_ptr[:, None] + offs_c[None, :], mask=live[:, None], other=0.0)
    else:
        return tl.load(rows_ptr[:, None] + offs_c[None, :])


@triton.jit
def _load_values_by_4(v_base, n0, stride_v, n_tokens, offs_d, BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """The V tile [BLOCK_N, D] as four loads of every fourth key, joined so that each thread holds
    four consecutive keys of its channels (see hopper_paths); keys past n_tokens read as 0 with
    MASKED."""
    offs_g = n0 + 4 * tl.arange(0, BLOCK_N // 4)
    v0 = _load_rows(v_base + offs_g * stride_v, offs_d, offs_g < n_tokens, MASKED)
    v1 = _load_rows(v_base + (offs_g + 1) * stride_v, offs_d, offs_g + 1 < n_tokens, MASKED)
    v2 = _load_rows(v_base + (offs_g + 2) * stride_v, offs_d, offs_g + 2 < n_tokens, MASKED)
    v3 = _load_rows(v_base + (offs_g + 3) * stride_v, offs_d, offs_g + 3 < n_tokens, MASKED)
    v = tl.join(tl.join(v0, v2), tl.join(v1, v3))  # [G, D, a, b]: key 4g + 2a + b
    D: tl.constexpr = offs_d.shape[0]
    return tl.reshape(tl.permute(tl.reshape(v, [BLOCK_N // 4, D, 4]), [0, 2, 1]), [BLOCK_N, D])


@triton.jit
def _scores(q_lo, q_hi, k_rows, live, D: tl.constexpr, FP8: tl.constexpr, DT: tl.constexpr,
            INTERPRET: tl.constexpr, MASKED: tl.constexpr):
    """q.k^T [M, N] from _query's tile and the key rows k_rows[:, None] + channel (with MASKED,
    rows `live` only): at head_dim 128 two dots over 64 channels each, else one."""
    C: tl.constexpr = q_lo.shape[1]
    offs_c = tl.arange(0, C)
    k_lo = _load_rows(k_rows, offs_c, live, MASKED)
    if not FP8:
        k_lo = k_lo.to(tl.float32) if INTERPRET else k_lo.to(DT)
    s = tl.dot(q_lo, tl.trans(k_lo))
    if D > 64:
        k_hi = _load_rows(k_rows + C, offs_c, live, MASKED)
        if not FP8:
            k_hi = k_hi.to(tl.float32) if INTERPRET else k_hi.to(DT)
        s = tl.dot(q_hi, tl.trans(k_hi), s)
    return s


@triton.jit
def _attend_tile(acc, m_i, l_i, n0, n_tokens, q_lo, q_hi, score_scale, q_bias, offs_d, k_base, v_base,
                 stride_k, stride_v, UNIT_FP8: tl.constexpr, BLOCK_N: tl.constexpr, DT: tl.constexpr,
                 INTERPRET: tl.constexpr, HOPPER: tl.constexpr, MASKED: tl.constexpr, ROWS: tl.constexpr = False):
    """One step of the online softmax over keys n0 .. n0 + BLOCK_N of a unit. q_bias = the rows'
    mean term, or -inf for rows that may not see the unit. MASKED: keys past n_tokens (the unit's
    last, partial tile) get no score, and with ROWS no key gets one in a row that may not see the
    unit (its -inf bias alone would turn a NaN score, from a NaN in K, into a NaN weight)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    live = offs_n < n_tokens
    s = _scores(q_lo, q_hi, k_base + offs_n * stride_k, live, offs_d.shape[0], UNIT_FP8, DT, INTERPRET, MASKED)
    if UNIT_FP8 and HOPPER:
        v = _load_values_by_4(v_base, n0, stride_v, n_tokens, offs_d, BLOCK_N, MASKED)
    else:
        v = _load_rows(v_base + offs_n * stride_v, offs_d, live, MASKED)
    # A row's scores are s * score_scale + q_bias, score_scale > 0: their max is taken on the raw
    # scores, and each exponent below is one FMA (the scale, bias and max folded per row).
    if MASKED:
        if ROWS:
            s = tl.where(live[None, :] & (q_bias > float("-inf"))[:, None], s, float("-inf"))
        else:
            s = tl.where(live[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1) * score_scale + q_bias)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    # 4. P.V: FP8 with P scaled by P_SCALE (folded into the exponent: 2^(s - m + log2 448)), or
    # bf16 (fp32 in the interpreter, whose bf16 dot is broken)
    if UNIT_FP8:
        p = tl.exp2(s * score_scale[:, None] + (q_bias - m_safe + LOG2_P_SCALE)[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1) * (1.0 / P_SCALE)
        # Hopper's FP8 wgmma keeps 13 mantissa bits of the accumulator it adds into (SageAttention2,
        # DeepSeek-V3): over a cache of thousands of keys that error would grow with its length,
        # so each tile's P.V is summed on its own and added to acc in fp32 (two-level accumulation)
        if HOPPER:
            acc = acc * alpha[:, None] + tl.dot(to_e4m3(p, INTERPRET), v)
        else:
            acc = tl.dot(to_e4m3(p, INTERPRET), v, acc * alpha[:, None])
    else:
        acc = acc * alpha[:, None]
        p = tl.exp2(s * score_scale[:, None] + (q_bias - m_safe)[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if INTERPRET:
            acc = tl.dot(p, v.to(tl.float32), acc)
        else:
            acc = tl.dot(p.to(DT), v.to(DT), acc)
    return acc, m_new, l_i


@triton.jit
def _to_unit(v_scale_row, offs_d, UNIT_FP8: tl.constexpr, V_SCALED: tl.constexpr, VOLATILE: tl.constexpr):
    """[D]: the factor that takes acc into a unit's V-scale units (times P_SCALE for FP8 P), so
    each P.V product accumulates in place in the tensor cores' accumulator while the unit is
    read (V_SCALED False: V has no scale)."""
    if V_SCALED:
        v_scale = tl.load(v_scale_row + offs_d, volatile=VOLATILE)
    else:
        v_scale = tl.full(offs_d.shape, 1.0, tl.float32)
    if UNIT_FP8:
        return P_SCALE / v_scale
    else:
        return 1.0 / v_scale


@triton.jit
def _attend_unit(acc, m_i, l_i, q_rows, rows, q_delta, visible, offs_d,
                 k_base, v_base, stride_k, stride_v, n_tokens, k_scale, k_mean, v_scale_row, sm_scale_log2,
                 rope_ptr, rope_center, UNIT_FP8: tl.constexpr, V_SCALED: tl.constexpr, ROPE_DIMS: tl.constexpr,
                 BLOCK_N: tl.constexpr, DT: tl.constexpr, INTERPRET: tl.constexpr, HOPPER: tl.constexpr,
                 ROWS_DIFFER: tl.constexpr = False):
    """The online softmax over one key unit. ROWS_DIFFER: rows of the tile may differ in whether they
    see it (`visible`: a block mask, a private block, a lag), so a tile some rows may not see is
    masked for them element by element."""
    to_unit = _to_unit(v_scale_row, offs_d, UNIT_FP8, V_SCALED, False)
    # 1.-3. the query tile rotated for this unit, quantized, and its mean term
    q_lo, q_hi, q_scale, q_mean = _query(q_rows, rows, q_delta, k_mean, sm_scale_log2, rope_ptr, rope_center,
                                         offs_d.shape[0], ROPE_DIMS, UNIT_FP8, DT, INTERPRET)
    score_scale = q_scale * (k_scale * sm_scale_log2)
    acc = acc * to_unit[None, :]
    q_bias = tl.where(visible, q_mean, float("-inf"))
    n_plain = n_tokens - n_tokens % BLOCK_N
    if ROWS_DIFFER:  # whole tiles go unmasked only where every row of the tile sees the unit
        n_plain = n_plain * (tl.min(visible.to(tl.int32), axis=0) > 0).to(tl.int32)
    for n0 in range(0, n_plain, BLOCK_N):
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, n0, n_tokens, q_lo, q_hi, score_scale, q_bias, offs_d, k_base,
                                     v_base, stride_k, stride_v, UNIT_FP8, BLOCK_N, DT, INTERPRET, HOPPER, False)
    if ROWS_DIFFER:  # the rest masked, unpipelined (every tile only in a query tile that straddles two
        # blocks, one or two per frame: not worth a pipeline's registers)
        for n0 in tl.range(n_plain, n_tokens, BLOCK_N, num_stages=1):
            acc, m_i, l_i = _attend_tile(acc, m_i, l_i, n0, n_tokens, q_lo, q_hi, score_scale, q_bias, offs_d,
                                         k_base, v_base, stride_k, stride_v, UNIT_FP8, BLOCK_N, DT, INTERPRET, HOPPER,
                                         True, True)
    elif n_plain < n_tokens:  # the last, partial tile
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, n_plain, n_tokens, q_lo, q_hi, score_scale, q_bias, offs_d,
                                     k_base, v_base, stride_k, stride_v, UNIT_FP8, BLOCK_N, DT, INTERPRET, HOPPER, True)
    if HOPPER:  # accumulators in registers: a thread's 32 columns of to_unit, held across the key
        # loop, cost 32 registers (64-key tiles spilled so); read again instead (volatile: not merged)
        to_unit = _to_unit(v_scale_row, offs_d, UNIT_FP8, V_SCALED, True)
    acc = acc * (1.0 / to_unit)[None, :]
    return acc, m_i, l_i


@triton.jit
def _attend_page(acc, m_i, l_i, q_rows, rows, q_slot, slot, page_ptr, visible, offs_d, b, h, B, H,
                 ck_ptr, cv_ptr, cks_ptr, ckm_ptr, cvs_ptr, cache_T, sm_scale_log2, rope_ptr, rope_center,
                 D: tl.constexpr, CACHE_FP8: tl.constexpr, ROPE_DIMS: tl.constexpr, BLOCK_N: tl.constexpr,
                 DT: tl.constexpr, INTERPRET: tl.constexpr, HOPPER: tl.constexpr, ROWS_DIFFER: tl.constexpr = False):
    page = tl.load(page_ptr).to(tl.int64)
    row = (page * B + b) * H + h
    base = (page * B + b) * cache_T * H * D + h * D
    return _attend_unit(acc, m_i, l_i, q_rows, rows, q_slot - slot, visible, offs_d, ck_ptr + base, cv_ptr + base,
                        H * D, H * D, cache_T, tl.load(cks_ptr + row), tl.load(ckm_ptr + row * D + offs_d),
                        cvs_ptr + row * D, sm_scale_log2, rope_ptr, rope_center, CACHE_FP8, True, ROPE_DIMS, BLOCK_N, DT,
                        INTERPRET, HOPPER, ROWS_DIFFER)


# Counts that change as the cache fills are not specialized (as 1, or as divisible by 16), nor is
# the alignment of pointers read one scalar at a time (a layer's or a page's row of scales starts
# 16-byte aligned or not with the layer or page): each new class would compile the kernel anew in
# the middle of a stream, for no better code.
@triton.jit(do_not_specialize=["split_units", "n_pages", "n_sinks", "keep_count", "first_slot"],
            do_not_specialize_on_alignment=["cks_ptr", "kks_ptr", "pks_ptr", "page_table_ptr", "private_ptr",
                                            "slots_ptr", "lags_ptr"])
def temporal_attention_kernel(
    q_ptr, out_ptr, lse_ptr, stride_qb, stride_ql, stride_qh, stride_os, stride_ob, stride_ol, stride_oh,
    stride_ls, split_units,
    ck_ptr, cv_ptr, cks_ptr, ckm_ptr, cvs_ptr, page_table_ptr, n_pages, n_sinks, cache_T,
    kk_ptr, kv_ptr, kks_ptr, kkm_ptr, kvs_ptr, keep_count, keep_cap,
    pk_ptr, pv_ptr, pks_ptr, pkm_ptr, pvs_ptr, stride_pkb, stride_pkl, stride_pkh, stride_pvb, stride_pvl,
    stride_pvh, n_units, unit_T, private_ptr, slots_ptr, lags_ptr, block_units,
    B, H, Lq, first_slot, sm_scale_log2, rope_ptr, rope_center,
    D: tl.constexpr, ROPE_DIMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CACHE_FP8: tl.constexpr, PASS_FP8: tl.constexpr, CAUSAL: tl.constexpr, DT: tl.constexpr,
    INTERPRET: tl.constexpr, HOPPER: tl.constexpr, LAGGED: tl.constexpr,
):
    """Program (query tile, batch*head, split): the split reads key units [lo, hi) of the slot order
    (sinks, keep buffer, window, the pass's units), split_units each, and writes its own output
    and LSE (out_ptr/lse_ptr + split * stride_os/stride_ls), which a combine kernel merges when
    there are several; a row that sees none of the split's keys gets 0 and an LSE of -inf."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1) // H
    h = tl.program_id(1) % H
    split = tl.program_id(2)
    lo = split * split_units
    hi = lo + split_units
    has_keep = tl.where(keep_count > 0, 1, 0)
    n_cached = n_pages + has_keep
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    rows = offs_m < Lq
    q_rows = q_ptr + b.to(tl.int64) * stride_qb + h * stride_qh + offs_m[:, None].to(tl.int64) * stride_ql
    row_unit = offs_m // unit_T  # a unit is one frame (with a cache) or one block; a block is whole units
    q_slot = first_slot + tl.load(slots_ptr + row_unit, mask=rows, other=0)
    all_rows = offs_m >= 0
    zeros_d = tl.zeros([D], dtype=tl.float32)
    if LAGGED:  # frame_lags: a row's oldest `lag` window pages are hidden, sinks and keep `lag` slots nearer
        row_lag = tl.load(lags_ptr + row_unit, mask=rows, other=0)
    else:
        row_lag = tl.zeros_like(q_slot)

    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    # cached units in slot order: sink pages, the keep buffer, window pages ([P, B, T, H, D])
    page_stride_t = H * D
    for i in range(lo, tl.minimum(hi, n_sinks)):
        acc, m_i, l_i = _attend_page(acc, m_i, l_i, q_rows, rows, q_slot - row_lag, i, page_table_ptr + i, all_rows,
                                     offs_d, b, h, B, H,
                                     ck_ptr, cv_ptr, cks_ptr, ckm_ptr, cvs_ptr, cache_T, sm_scale_log2, rope_ptr, rope_center,
                                     D, CACHE_FP8, ROPE_DIMS, BLOCK_N, DT, INTERPRET, HOPPER)
    if (keep_count > 0) & (lo <= n_sinks) & (n_sinks < hi):
        row = b * H + h
        base = b.to(tl.int64) * keep_cap * H * D + h * D
        acc, m_i, l_i = _attend_unit(
            acc, m_i, l_i, q_rows, rows, q_slot - row_lag - n_sinks, all_rows, offs_d, kk_ptr + base, kv_ptr + base,
            page_stride_t, page_stride_t, keep_count, tl.load(kks_ptr + row), tl.load(kkm_ptr + row * D + offs_d),
            kvs_ptr + row * D, sm_scale_log2, rope_ptr, rope_center, CACHE_FP8, True, ROPE_DIMS, BLOCK_N, DT, INTERPRET, HOPPER)
    for i in range(tl.maximum(n_sinks, lo - has_keep), tl.minimum(n_pages, hi - has_keep)):
        seen = all_rows
        if LAGGED:  # window page i - n_sinks: hidden from rows that lag past it (a -inf bias, as masks)
            seen = row_lag <= i - n_sinks
        acc, m_i, l_i = _attend_page(acc, m_i, l_i, q_rows, rows, q_slot, i + has_keep,
                                     page_table_ptr + i, seen, offs_d, b, h, B, H,
                                     ck_ptr, cv_ptr, cks_ptr, ckm_ptr, cvs_ptr, cache_T, sm_scale_log2, rope_ptr,
                                     rope_center, D, CACHE_FP8, ROPE_DIMS, BLOCK_N, DT, INTERPRET, HOPPER, LAGGED)

    # the pass's own units (frames with a cache, mask blocks without)
    row_block = row_unit // block_units
    for u in range(tl.maximum(lo - n_cached, 0), tl.minimum(n_units, hi - n_cached)):
        unit_block = u // block_units
        if CAUSAL:
            private = tl.load(private_ptr + unit_block) != 0
            visible = (row_block == unit_block) | ((unit_block < row_block) & (not private))
        else:
            visible = all_rows
        if tl.max(visible.to(tl.int32), axis=0) > 0:  # skip units no row of the tile may see
            if PASS_FP8:  # the workspace [U, B, unit_T, H, D] written by kv_cache_commit
                row = (u * B + b) * H + h
                k_base = pk_ptr + (u * B + b).to(tl.int64) * unit_T * H * D + h * D
                v_base = pv_ptr + (u * B + b).to(tl.int64) * unit_T * H * D + h * D
                acc, m_i, l_i = _attend_unit(
                    acc, m_i, l_i, q_rows, rows, q_slot - (first_slot + tl.load(slots_ptr + u)), visible, offs_d, k_base, v_base,
                    page_stride_t, page_stride_t, unit_T, tl.load(pks_ptr + row),
                    tl.load(pkm_ptr + row * D + offs_d), pvs_ptr + row * D,
                    sm_scale_log2, rope_ptr, rope_center, True, True, ROPE_DIMS, BLOCK_N, DT, INTERPRET, HOPPER, CAUSAL)
            else:  # the input K/V themselves, unquantized; unmasked, one unit is the whole pass, whose
                # rows a token stride apart may span 2^31 elements: int64 strides (tl.cast: 1 is a constexpr)
                start = (u * unit_T).to(tl.int64)
                k_base = pk_ptr + b.to(tl.int64) * stride_pkb + h * stride_pkh + start * stride_pkl
                v_base = pv_ptr + b.to(tl.int64) * stride_pvb + h * stride_pvh + start * stride_pvl
                acc, m_i, l_i = _attend_unit(
                    acc, m_i, l_i, q_rows, rows, q_slot - (first_slot + tl.load(slots_ptr + u)), visible, offs_d, k_base, v_base,
                    tl.cast(stride_pkl, tl.int64), tl.cast(stride_pvl, tl.int64), unit_T, 1.0, zeros_d, pvs_ptr,
                    sm_scale_log2, rope_ptr, rope_center, False, False, ROPE_DIMS, BLOCK_N, DT, INTERPRET, HOPPER, CAUSAL)

    seen = l_i > 0  # l >= 1 for a row that saw a key (its max counts 1); acc = 0 where none
    out = acc * (1.0 / tl.where(seen, l_i, 1.0))[:, None]
    o_rows = out_ptr + split.to(tl.int64) * stride_os + b.to(tl.int64) * stride_ob + h * stride_oh + \
        offs_m[:, None].to(tl.int64) * stride_ol
    tl.store(o_rows + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=rows[:, None])
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) / _LOG2E, float("-inf"))  # natural log
    tl.store(lse_ptr + split.to(tl.int64) * stride_ls + (b * H + h).to(tl.int64) * Lq + offs_m, lse, mask=rows)


@triton.jit
def attention_combine_kernel(part_ptr, part_lse_ptr, out_ptr, lse_ptr, splits, stride_ps, stride_ls,
                             stride_ob, stride_ol, stride_oh, H, Lq, D: tl.constexpr, BLOCK_M: tl.constexpr):
    """out = sum over splits of part_s * exp(lse_s - lse), lse = log sum exp(lse_s): the splits'
    outputs [S, B, L, H, D] (fp32, each normalized by its own sum) and LSEs [S, B, H, L] merged."""
    b = tl.program_id(1) // H
    h = tl.program_id(1) % H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    rows = offs_m < Lq
    lse_rows = part_lse_ptr + (b * H + h).to(tl.int64) * Lq + offs_m
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for s in range(0, splits):
        m = tl.maximum(m, tl.load(lse_rows + s * stride_ls, mask=rows, other=0.0))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    part_rows = part_ptr + ((b * Lq + offs_m[:, None]).to(tl.int64) * H + h) * D + offs_d[None, :]
    for s in range(0, splits):
        w = tl.exp2((tl.load(lse_rows + s * stride_ls, mask=rows, other=0.0) - m_safe) * _LOG2E)
        total += w
        acc += w[:, None] * tl.load(part_rows + s * stride_ps, mask=rows[:, None], other=0.0)
    o_rows = out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + offs_m[:, None].to(tl.int64) * stride_ol
    tl.store(o_rows + offs_d[None, :], (acc / total[:, None]).to(out_ptr.dtype.element_ty), mask=rows[:, None])
    tl.store(lse_ptr + (b * H + h).to(tl.int64) * Lq + offs_m, m_safe + tl.log(total), mask=rows)


@triton.jit(do_not_specialize=["table_index", "slot", "first_slot", "window_index"],  # see temporal_attention_kernel
            do_not_specialize_on_alignment=["cks_ptr", "page_table_ptr", "slots_ptr", "lags_ptr"])
def attention_mass_kernel(
    q_ptr, lse_ptr, stride_qb, stride_ql, stride_qh, ck_ptr, cks_ptr, ckm_ptr, mass_ptr,
    page_table_ptr, table_index, slot, B, H, Lq, cache_T, first_slot, unit_T, slots_ptr, lags_ptr, window_index,
    sm_scale_log2, rope_ptr, rope_center,
    D: tl.constexpr, ROPE_DIMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CACHE_FP8: tl.constexpr, DT: tl.constexpr, INTERPRET: tl.constexpr, LAGGED: tl.constexpr,
):
    """mass[page, b, t] += sum over queries (and, by atomics, heads) of softmax(q.k_t) for one page,
    page = page_table[table_index]: read on the device, so a captured graph follows the ring. The
    scores are the attention's own (16-bit pages are multiplied in q's dtype DT, as there), so
    they match the LSE it wrote. Each head's sum is added in int64 fixed point (MASS_SCALE), so the
    total does not depend on the order of the heads' atomics."""
    pid_n = tl.program_id(0)
    page = tl.load(page_table_ptr + table_index).to(tl.int64)
    b = tl.program_id(1) // H
    h = tl.program_id(1) % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    live = offs_n < cache_T
    row = (page * B + b) * H + h
    base = (page * B + b).to(tl.int64) * cache_T * H * D + h * D
    k_rows = ck_ptr + base + offs_n * (H * D)
    k_scale = tl.load(cks_ptr + row)
    k_mean = tl.load(ckm_ptr + row * D + offs_d)
    mass = tl.zeros([BLOCK_N], dtype=tl.float32)
    for m0 in range(0, Lq, BLOCK_M):  # the same Q tiles, rotation and quantization as the attention
        offs_m = m0 + tl.arange(0, BLOCK_M)
        rows = offs_m < Lq
        q_rows = q_ptr + b.to(tl.int64) * stride_qb + h * stride_qh + offs_m[:, None].to(tl.int64) * stride_ql
        q_slot = first_slot + tl.load(slots_ptr + offs_m // unit_T, mask=rows, other=0)
        q_lo, q_hi, q_scale, q_mean = _query(q_rows, rows, q_slot - slot, k_mean, sm_scale_log2, rope_ptr, rope_center,
                                             D, ROPE_DIMS, CACHE_FP8, DT, INTERPRET)
        s = _scores(q_lo, q_hi, k_rows, live, D, CACHE_FP8, DT, INTERPRET, True) * (q_scale * (k_scale * sm_scale_log2))[:, None]
        lse2 = tl.load(lse_ptr + (b * H + h).to(tl.int64) * Lq + offs_m, mask=rows, other=0.0) * 1.4426950408889634
        p = tl.exp2(s + q_mean[:, None] - lse2[:, None])
        if LAGGED:  # rows that lag past this window page do not see it
            rows = rows & (tl.load(lags_ptr + offs_m // unit_T, mask=rows, other=0) <= window_index)
        mass += tl.sum(tl.where(rows[:, None], p, 0.0), axis=0)
    x = mass * _MASS_SCALE  # >= 0; from 2^23 on an integer, where x + 0.5 would round to even
    fixed = tl.where(x < 8388608.0, x + 0.5, x).to(tl.int64)  # to nearest, ties up (as the reference)
    tl.atomic_add(mass_ptr + (page * B + b).to(tl.int64) * cache_T + offs_n, fixed, mask=live)


_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def temporal_attention(q, k, v, plan, view, *, interpret=False, out=None, lse=None):
    """Launch on validated inputs (see xjfast.ops.temporal_attention). Returns (out, lse), written
    into `out` [B, L, H, D] and `lse` [B, H, L] when given (the tests pass poisoned buffers)."""
    from xjfast.ops.temporal_attention import kernel_tables, output_buffers, pass_pages

    B, L, H, D = q.shape
    fp8 = plan.precision == "fp8"
    block_m, block_n, warps, stages = launch_config(q, plan, view, interpret)
    out, lse = output_buffers(q, out, lse)
    tables = kernel_tables(plan, view, q)
    unit_T = tables.unit_tokens
    n_units = L // unit_T
    if fp8:
        pass_k, pass_v, pass_ks, pass_km, pass_vs = pass_pages(
            k, v, unit_T, lambda *args: kv_cache_commit(*args, interpret=interpret))
    else:
        pass_k, pass_v, pass_ks, pass_km, pass_vs = k, v, lse, lse, lse  # scales unused
    if view is not None:
        cache = (view.k_pages, view.v_pages, view.k_scale, view.k_mean, view.v_scale, view.page_table,
                 view.page_table.numel(), view.num_sinks, view.k_pages.shape[2])
        keep = (view.keep_k, view.keep_v, view.keep_k_scale, view.keep_k_mean, view.keep_v_scale, view.keep_count,
                view.keep_k.shape[1])
        cache_fp8 = fp8 and view.storage == "fp8"
    else:  # no cache: zero pages and an empty keep buffer; the pointers are never read, but
        # typed as the pass's own so that the kernel compiles one unit precision (two spilled)
        cache = (pass_k, pass_v, lse, lse, lse, lse, 0, 0, 1)
        keep = (pass_k, pass_v, lse, lse, lse, 0, 1)
        cache_fp8 = fp8
    first_slot, rope_dims, rope_center = tables.first_slot, tables.rope_dims, tables.rope_center
    rope = tables.rope if tables.rope is not None else lse  # never read without a rotary
    slots = tables.slots
    sm_scale_log2 = plan.scale * LOG2E
    splits, split_units = split_plan(q, plan, view, interpret)
    if splits > 1:  # each split's output and LSE, merged below
        part = torch.empty(splits, B, L, H, D, device=q.device, dtype=torch.float32)
        part_lse = torch.empty(splits, B, H, L, device=q.device, dtype=torch.float32)
        o_strides = part.stride()[:4]
    else:
        part, part_lse, o_strides = out, lse, (0, *out.stride()[:3])
    grid = (triton.cdiv(L, block_m), B * H, splits)
    launch(
        temporal_attention_kernel, grid,
        q, part, part_lse, q.stride(0), q.stride(1), q.stride(2), *o_strides, B * H * L, split_units,
        *cache, *keep,
        pass_k, pass_v, pass_ks, pass_km, pass_vs, k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), n_units, unit_T, tables.private, slots, tables.lags,
        plan.block_tokens // unit_T, B, H, L, first_slot, sm_scale_log2, rope, rope_center,
        D=D, ROPE_DIMS=rope_dims, BLOCK_M=block_m, BLOCK_N=block_n, CACHE_FP8=cache_fp8, PASS_FP8=fp8,
        CAUSAL=plan.causal, DT=_DTYPES[q.dtype], INTERPRET=interpret, LAGGED=bool(plan.frame_lags),
        HOPPER=hopper_paths(None if interpret else torch.cuda.get_device_capability(q.device)),
        num_warps=warps, num_stages=stages,
    )
    if splits > 1:
        launch(
            attention_combine_kernel, (triton.cdiv(L, COMBINE_ROWS), B * H),
            part, part_lse, out, lse, splits, part.stride(0), part_lse.stride(0), out.stride(0), out.stride(1),
            out.stride(2), H, L, D=D, BLOCK_M=COMBINE_ROWS, num_warps=4)
    if view is not None and view.mass is not None:
        for table_index, slot in view.mass_units:
            launch(
                attention_mass_kernel, (triton.cdiv(view.k_pages.shape[2], block_n), B * H),
                q, lse, q.stride(0), q.stride(1), q.stride(2), view.k_pages, view.k_scale, view.k_mean, view.mass,
                view.page_table, table_index, slot, B, H, L, view.k_pages.shape[2], first_slot, unit_T, slots,
                tables.lags, table_index - view.num_sinks, sm_scale_log2, rope, rope_center, D=D, ROPE_DIMS=rope_dims,
                BLOCK_M=Q_TILE, BLOCK_N=block_n, CACHE_FP8=cache_fp8, DT=_DTYPES[q.dtype], INTERPRET=interpret,
                LAGGED=bool(plan.frame_lags), num_warps=warps, num_stages=stages)
    return out, lse
