"""Triton denoise_step: the sampler step in one pass, with Philox4x32-10 noise drawn in-kernel.

Each program handles BLOCK elements of one latent frame's flattened [B, C, H, W] (in groups of
4, one Philox call per group, as DESIGN.md fixes the mapping), reads x_t and the model output
(latent layout, or the head's patchified token layout, un-patchified through index math), and
writes x0 and, with a next sigma, x_next = (1 - sigma_next) * x0 + sigma_next * eps.
The frame index is a scalar argument, or read from device memory (FRAME_IN_MEMORY) so that a
captured CUDA graph draws each replayed frame's own noise.
"""
import torch
import triton
import triton.language as tl

from .launch import launch

PHILOX_M0 = tl.constexpr(0xD2511F53)
PHILOX_M1 = tl.constexpr(0xCD9E8D57)
PHILOX_W0 = tl.constexpr(0x9E3779B9)
PHILOX_W1 = tl.constexpr(0xBB67AE85)
BLOCK = 1024  # elements per program: 256 Philox groups


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 tensors: ten rounds of (hi, lo) = m * c with Weyl-bumped keys."""
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(PHILOX_M0, c0)
        lo0 = c0 * PHILOX_M0
        hi1 = tl.umulhi(PHILOX_M1, c2)
        lo1 = c2 * PHILOX_M1
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + PHILOX_W0
        k1 = k1 + PHILOX_W1
    return c0, c1, c2, c3


@triton.jit
def philox_normal4(g, frame, seed_lo, seed_hi):
    """Four N(0, 1) draws per group g of a latent frame (DESIGN.md's mapping): counter =
    (g lo, g hi, frame lo, frame hi), key = seed; Box-Muller on the words (u1, u3) with radii
    from (u0, u2), u = (x + 1) * 2^-32 in (0, 1]."""
    g = g.to(tl.uint64)
    f = frame.to(tl.uint64)
    c0 = (g & 0xFFFFFFFF).to(tl.uint32)
    c1 = (g >> 32).to(tl.uint32)
    c2 = (f & 0xFFFFFFFF).to(tl.uint32) + tl.zeros_like(c0)
    c3 = (f >> 32).to(tl.uint32) + tl.zeros_like(c0)
    k0 = seed_lo.to(tl.uint32) + tl.zeros_like(c0)
    k1 = seed_hi.to(tl.uint32) + tl.zeros_like(c0)
    x0, x1, x2, x3 = philox4x32_10(c0, c1, c2, c3, k0, k1)
    r0 = tl.sqrt(-2.0 * tl.log(uniform(x0)))
    r2 = tl.sqrt(-2.0 * tl.log(uniform(x2)))
    c1, s1 = sincos_2pi(uniform(x1))
    c3, s3 = sincos_2pi(uniform(x3))
    return r0 * c1, r0 * s1, r2 * c3, r2 * s3


@triton.jit
def sincos_2pi(u):
    """(cos 2 pi u, sin 2 pi u) for u in [0, 1], as CUDA's sincospif(2u): 4u = q + r with a whole
    quadrant q and |r| <= 1/2 (exact in fp32), then polynomials on [-pi/4, pi/4]. tl.cos/tl.sin
    would lower (on some Triton versions) to libdevice's general sinf/cosf, whose never-taken
    large-argument path costs a local-memory stack frame."""
    v = 4.0 * u
    q = tl.floor(v + 0.5)
    a = (v - q) * 1.5707963267948966
    a2 = a * a
    s = a * (1.0 + a2 * (-1.0 / 6 + a2 * (1.0 / 120 + a2 * (-1.0 / 5040 + a2 * (1.0 / 362880)))))
    c = 1.0 + a2 * (-0.5 + a2 * (1.0 / 24 + a2 * (-1.0 / 720 + a2 * (1.0 / 40320 + a2 * (-1.0 / 3628800)))))
    quadrant = q.to(tl.int32) & 3  # cos(q pi/2 + a), sin(q pi/2 + a)
    cos = tl.where(quadrant == 0, c, tl.where(quadrant == 1, -s, tl.where(quadrant == 2, -c, s)))
    sin = tl.where(quadrant == 0, s, tl.where(quadrant == 1, c, tl.where(quadrant == 2, -s, -c)))
    return cos, sin


@triton.jit
def uniform(x):
    return (x.to(tl.float32) + 1.0) * 2.3283064365386963e-10


# Triton's launcher compiles an integer argument equal to 1 as the constant 1, and one divisible
# by 16 apart: a seed of 1 broke `.to(tl.uint32)`, and a frame index would compile anew mid-stream.
@triton.jit(do_not_specialize=["frame_index", "seed_lo", "seed_hi"])
def denoise_step_kernel(
    xt_ptr, mo_ptr, coef_ptr, x0_ptr, xn_ptr,
    s_xb, s_xc, s_xf, s_xh, s_xw, s_m0, s_m1, s_m2, s_m3, s_m4,
    total, C, H, W, F, frame_index, frame_ptr, seed_lo, seed_hi,
    TOKENS: tl.constexpr, PT: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, HAS_NEXT: tl.constexpr,
    FRAME_IN_MEMORY: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program: BLOCK elements (BLOCK / 4 Philox groups) of local frame program_id(1). With ROWS
    (W % 4 == 0) a group is four neighbours of one row: its coordinates are computed once, and
    the latent strides come divided by 4 (the host checked), so that the compiler sees x_t, a
    latent model_out and the outputs move four elements per access."""
    f = tl.program_id(1)
    group = tl.program_id(0) * (BLOCK // 4) + tl.arange(0, BLOCK // 4)
    lane = tl.arange(0, 4)[None, :]
    if ROWS:
        W4 = W // 4
        live = (group < total // 4)[:, None]
        row = group // W4
        xq = (group % W4)[:, None]
        x = xq * 4 + lane
        y = (row % H)[:, None]
        c = ((row // H) % C)[:, None]
        b = (row // (H * C))[:, None]
        xt_at = (b * s_xb + c * s_xc + f * s_xf + y * s_xh + xq) * 4 + lane
        out = ((((b * C + c) * F + f) * H + y) * W4 + xq) * 4 + lane
    else:
        i = group[:, None] * 4 + lane  # [groups, 4]: element of the frame's [B, C, H, W]
        live = i < total
        b = i // (C * H * W)
        c = (i // (H * W)) % C
        y = (i // W) % H
        x = i % W
        xt_at = b * s_xb + c * s_xc + f * s_xf + y * s_xh + x * s_xw
        out = (((b * C + c) * F + f) * H + y) * W + x
    xt = tl.load(xt_ptr + xt_at, mask=live, other=0.0).to(tl.float32)
    if TOKENS:  # the head's [B, N, PT*PH*PW*C] tokens, Wan2.1's channel order (pt, ph, pw, c)
        token = ((f // PT) * (H // PH) + y // PH) * (W // PW) + x // PW
        channel = (((f % PT) * PH + y % PH) * PW + x % PW) * C + c
        mo = tl.load(mo_ptr + b * s_m0 + token * s_m1 + channel * s_m2, mask=live, other=0.0)
    elif ROWS:
        mo = tl.load(mo_ptr + (b * s_m0 + c * s_m1 + f * s_m2 + y * s_m3 + xq) * 4 + lane, mask=live, other=0.0)
    else:
        mo = tl.load(mo_ptr + b * s_m0 + c * s_m1 + f * s_m2 + y * s_m3 + x * s_m4, mask=live, other=0.0)
    # per-sample coefficients [B, 4]: x0 = a x_t + m model_out; x_next = keep x0 + noise eps
    a = tl.load(coef_ptr + b * 4 + 0, mask=live, other=0.0)
    m = tl.load(coef_ptr + b * 4 + 1, mask=live, other=0.0)
    x0 = a * xt + m * mo.to(tl.float32)
    tl.store(x0_ptr + out, x0.to(x0_ptr.dtype.element_ty), mask=live)
    if HAS_NEXT:
        if FRAME_IN_MEMORY:
            frame = tl.load(frame_ptr) + f
        else:  # int64: an index below 2^31 arrives as int32, where + f would wrap at 2^31
            frame = frame_index.to(tl.int64) + f
        n0, n1, n2, n3 = philox_normal4(group, frame, seed_lo, seed_hi)
        eps = tl.where(lane == 0, n0[:, None], tl.where(lane == 1, n1[:, None],
                                                        tl.where(lane == 2, n2[:, None], n3[:, None])))
        keep = tl.load(coef_ptr + b * 4 + 2, mask=live, other=0.0)
        noise = tl.load(coef_ptr + b * 4 + 3, mask=live, other=0.0)
        tl.store(xn_ptr + out, (keep * x0 + noise * eps).to(xn_ptr.dtype.element_ty), mask=live)


def denoise_step(x_t, model_out, coef, seed, frame_index, patch_size, x0, x_next):
    """Launch on validated tensors (see xjfast.ops.denoise_step); x0/x_next contiguous latents."""
    B, C, F, H, W = x_t.shape
    tokens = model_out.dim() == 3
    s_x = list(x_t.stride())
    s_m = list(model_out.stride()) + [0] * (5 - model_out.dim())
    # whole groups of four in a row, every latent stride a multiple of 4 (elements) and the last 1
    rows = W % 4 == 0 and s_x[4] == 1 and all(v % 4 == 0 for v in s_x[:4]) and (
        tokens or (s_m[4] == 1 and all(v % 4 == 0 for v in s_m[:4])))
    if rows:
        s_x = [v // 4 for v in s_x]
        if not tokens:
            s_m = [v // 4 for v in s_m]
    total = B * C * H * W
    grid = (triton.cdiv(total, BLOCK), F)
    in_memory = isinstance(frame_index, torch.Tensor)  # an int64 0-d tensor on x_t's device
    launch(
        denoise_step_kernel, grid,
        x_t, model_out, coef, x0, x_next if x_next is not None else x0, *s_x, *s_m,
        total, C, H, W, F, 0 if in_memory else frame_index, frame_index if in_memory else coef,
        seed & 0xFFFFFFFF, seed >> 32,
        TOKENS=tokens, PT=patch_size[0], PH=patch_size[1], PW=patch_size[2], HAS_NEXT=x_next is not None,
        FRAME_IN_MEMORY=in_memory, ROWS=rows, BLOCK=BLOCK, num_warps=4,
    )
