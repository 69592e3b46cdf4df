"""Shared Triton helpers: e4m3 conversion that is right on the GPU and in the interpreter.

On a GPU, `x.to(tl.float8e4nv)` compiles to `cvt.rn.satfinite` (round to nearest even,
saturating). Triton's CPU interpreter rounds some values wrongly (7.79 -> 4.0) and does not
saturate, so under `INTERPRET` the value is first rounded onto the e4m3 grid in fp32, after which
the cast is exact.
"""
import triton
import triton.language as tl

# constexpr so that jitted code may read them (= xjfast.ops.fp8's constants)
E4M3_MAX = tl.constexpr(448.0)
MIN_SCALE = tl.constexpr(1e-12)
P_SCALE = tl.constexpr(448.0)
LOG2_P_SCALE = tl.constexpr(8.807354922057604)  # log2(P_SCALE)


@triton.jit
def round_to_e4m3_grid(x):
    """Round fp32 x to the nearest e4m3 value (ties to even), saturating at +-448."""
    x = tl.minimum(tl.maximum(x, -448.0), 448.0)
    # spacing of e4m3 values near x: 2^(exponent - 3), never below the subnormal step 2^-9
    bits = (x.to(tl.int32, bitcast=True) & 0x7F800000) - (3 << 23)
    quantum = tl.maximum(bits, 118 << 23).to(tl.float32, bitcast=True)
    magic = 12582912.0  # 1.5 * 2^23: adding and subtracting it rounds to an integer, ties to even
    r = ((x / quantum + magic) - magic) * quantum
    return tl.where(r == 0.0, x * 0.0, r)  # keep the sign of a value rounded to zero, as the cast does


@triton.jit
def to_e4m3(x, INTERPRET: tl.constexpr):
    if INTERPRET:
        x = round_to_e4m3_grid(x)
    return x.to(tl.float8e4nv)


@triton.jit
def scale_from_amax(amax):
    return tl.maximum(amax, MIN_SCALE * E4M3_MAX) / E4M3_MAX


# ---- one quantization unit (a page, the keep buffer, a frame of an attention pass) -------------
# K is stored minus its per-channel mean with one scale; V with one scale per channel. The two
# passes over a unit's tokens share these helpers in every kernel that writes units.

@triton.jit
def unit_stats(k, v, live, k_sum, k_max, k_min, v_amax):
    """Fold a tile of K, V [tokens, D] (rows `live`) into the running statistics."""
    k_sum += tl.sum(tl.where(live, k, 0.0), axis=0)
    k_max = tl.maximum(k_max, tl.max(tl.where(live, k, float("-inf")), axis=0))
    k_min = tl.minimum(k_min, tl.min(tl.where(live, k, float("inf")), axis=0))
    v_amax = tl.maximum(v_amax, tl.max(tl.where(live, tl.abs(v), 0.0), axis=0))
    return k_sum, k_max, k_min, v_amax


@triton.jit
def store_stats(out, offs_d, D: tl.constexpr, k_sum, k_max, k_min, v_amax):
    """One chunk's partial statistics, [4, D] at `out` (a unit split over several programs)."""
    tl.store(out + offs_d, k_sum)
    tl.store(out + D + offs_d, k_max)
    tl.store(out + 2 * D + offs_d, k_min)
    tl.store(out + 3 * D + offs_d, v_amax)


@triton.jit
def combine_stats(parts, chunks, offs_d, D: tl.constexpr):
    """A unit's statistics from its chunks' partials [chunks, 4, D], combined in chunk order so
    that every program of the unit computes the same bits."""
    k_sum = tl.zeros([D], dtype=tl.float32)
    k_max = tl.full([D], float("-inf"), dtype=tl.float32)
    k_min = tl.full([D], float("inf"), dtype=tl.float32)
    v_amax = tl.zeros([D], dtype=tl.float32)
    for i in range(0, chunks):
        part = parts + i * 4 * D
        k_sum += tl.load(part + offs_d)
        k_max = tl.maximum(k_max, tl.load(part + D + offs_d))
        k_min = tl.minimum(k_min, tl.load(part + 2 * D + offs_d))
        v_amax = tl.maximum(v_amax, tl.load(part + 3 * D + offs_d))
    return k_sum, k_max, k_min, v_amax


@triton.jit
def unit_scales(k_sum, k_max, k_min, v_amax, count, FP8: tl.constexpr):
    """(K mean [D], K scale, V scale [D]): max |K - mean| = max(max - mean, mean - min)."""
    mean = k_sum / count
    if FP8:
        k_scale = scale_from_amax(tl.max(tl.maximum(k_max - mean, mean - k_min), axis=0))
        v_scale = scale_from_amax(v_amax)
    else:
        k_scale = 1.0
        v_scale = tl.full(v_amax.shape, 1.0, dtype=tl.float32)
    return mean, k_scale, v_scale


@triton.jit
def store_unit_tile(kp, vp, k, v, live, mean, k_scale, v_scale, FP8: tl.constexpr, INTERPRET: tl.constexpr):
    """Store a tile of K - mean and V, scaled, in the storage dtype (e4m3 or bf16/fp32)."""
    k = (k - mean[None, :]) / k_scale
    v = v / v_scale[None, :]
    if FP8:
        tl.store(kp, to_e4m3(k, INTERPRET), mask=live)
        tl.store(vp, to_e4m3(v, INTERPRET), mask=live)
    else:
        tl.store(kp, k.to(kp.dtype.element_ty), mask=live)
        tl.store(vp, v.to(vp.dtype.element_ty), mask=live)
