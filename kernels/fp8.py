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
