"""denoise_step: one sampler step, fused: x0 prediction, re-noising with in-kernel Philox noise,
and un-patchifying the model head's tokens into the latent layout.

Predictions (sigma is the noise level of x_t, per sample or shared):
- "flow" (rectified flow, as Wan): x0 = x_t - sigma * v;
  x_next = (1 - sigma_next) * x0 + sigma_next * eps.
- "x0": x0 = model_out; x_next as for "flow".
- "eps" (consistency models, as LCM): sigma = sqrt(1 - alpha_bar_t) and sigma_next =
  sqrt(1 - alpha_bar_prev) in the variance-preserving parametrization DDPM-trained models use;
  x0_pred = (x_t - sigma * eps_pred) / sqrt(1 - sigma^2) and, with LCM's boundary scalings at
  the discrete `timestep` t (sigma_data 0.5, timestep_scaling 10),
  x0 = c_out(t) * x0_pred + c_skip(t) * x_t; x_next = sqrt(1 - sigma_next^2) * x0 + sigma_next * eps.
  (A flow-form re-noise would not be the step these models were distilled for.) This is
  diffusers' LCMScheduler.step (prediction_type "epsilon", no clipping or thresholding, its
  defaults) with t = timesteps[k] and alpha_bar_prev = alphas_cumprod[timesteps[k + 1]]; on the
  schedule's last step LCM adds no noise: call without sigma_next.
eps is drawn per latent frame from Philox4x32-10 keyed by (noise_seed, frame_index + f): see
xjfast.ops.philox for the exact mapping every backend follows.
"""
from __future__ import annotations

import math

import torch

from xjfast.backends import check_backend, grid_reason, register, resolve
from xjfast.errors import check_choice, check_tensor, is_int
from xjfast.ops.philox import _check_seed, check_frame_index, latent_noise

PREDICTIONS = ("flow", "eps", "x0")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SIGMA_DATA, TIMESTEP_SCALING = 0.5, 10.0  # LCM's boundary condition defaults


def lcm_boundary_scalings(timestep: torch.Tensor):
    """(c_skip, c_out) of LCM's consistency boundary condition at discrete timesteps."""
    t = timestep.double() * TIMESTEP_SCALING
    return SIGMA_DATA ** 2 / (t ** 2 + SIGMA_DATA ** 2), t / (t ** 2 + SIGMA_DATA ** 2).sqrt()


def _per_sample(name: str, value, B: int, device, low=0.0, high=1.0) -> torch.Tensor:
    """[B] float64 on `device`. A number is checked on the host and written by a fill kernel, so
    the step stays free of host syncs and host-to-device copies (CUDA-graph capturable); a tensor
    is checked on its device (a sync)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not (math.isfinite(value) and low <= value <= high):
            raise ValueError(f"{name}: expected finite values in [{low}, {high}], got {[float(value)] * B}")
        return torch.full((B,), float(value), dtype=torch.float64, device=device)
    try:
        # True is no noise level, and a complex one would lose its imaginary part unseen
        kind = value.dtype if isinstance(value, torch.Tensor) else torch.as_tensor(value).dtype
        if kind == torch.bool or kind.is_complex:
            raise TypeError(f"dtype {kind}")
        t = torch.as_tensor(value, dtype=torch.float64, device=device) if not isinstance(value, torch.Tensor) \
            else value.to(device=device, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{name}: expected a number or a tensor of shape [{B}] (one per sample), "
                        f"got {value!r}") from exc
    if t.dim() == 0:
        t = t.expand(B)
    if t.shape != (B,):
        raise ValueError(f"{name}: expected a number or a tensor of shape [{B}] (one per sample), got shape "
                         f"{tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()) or bool((t < low).any()) or bool((t > high).any()):
        raise ValueError(f"{name}: expected finite values in [{low}, {high}], got {t.tolist()}")
    return t


def _check_patch_size(patch_size) -> tuple[int, int, int]:
    if not (isinstance(patch_size, (tuple, list)) and len(patch_size) == 3
            and all(is_int(p) and p > 0 for p in patch_size)):
        raise ValueError(f"patch_size: expected three positive ints (pt, ph, pw), got {patch_size!r}")
    return tuple(patch_size)


def _coefficients(prediction, sigma, sigma_next, timestep):
    """[B, 4] fp32: x0 = a * x_t + m * model_out, x_next = keep * x0 + noise * eps."""
    if prediction == "flow":
        a, m = torch.ones_like(sigma), -sigma
    elif prediction == "x0":
        a, m = torch.zeros_like(sigma), torch.ones_like(sigma)
    else:
        c_skip, c_out = lcm_boundary_scalings(timestep)
        root_alpha = (1 - sigma ** 2).sqrt()
        a, m = c_out / root_alpha + c_skip, -c_out * sigma / root_alpha
    if sigma_next is None:
        keep, noise = torch.zeros_like(sigma), torch.zeros_like(sigma)
    elif prediction == "eps":
        keep, noise = (1 - sigma_next ** 2).sqrt(), sigma_next
    else:
        keep, noise = 1 - sigma_next, sigma_next
    return torch.stack((a, m, keep, noise), dim=1).float()


def denoise_step(x_t, model_out, sigma, sigma_next=None, *, prediction="flow", noise_seed=None, frame_index=0,
                 out=None, backend="auto", patch_size=(1, 2, 2), timestep=None):
    """One sampler step on latents x_t [B, C, F, H, W] (frames frame_index .. frame_index + F - 1).

    frame_index: an int, or an int64 0-d tensor on x_t's device that the kernels read in device
    memory (the same noise, bit for bit): a step replayed from a CUDA graph advances it there.

    model_out: the same latent layout, or the model head's tokens [B, F/pt * H/ph * W/pw,
    pt*ph*pw*C] (Wan2.1's unpatchify order), un-patchified on the fly. Returns x0, or
    (x0, x_next) when sigma_next is given; `out` (a tensor, or a pair with sigma_next) receives
    them. Outputs are contiguous latents in x_t's dtype; arithmetic is fp32.
    """
    check_backend(backend)
    check_tensor("x_t", x_t, dtypes=DTYPES, ndim=5)
    check_tensor("model_out", model_out, dtypes=DTYPES, device=x_t.device)
    check_choice("prediction", prediction, PREDICTIONS)
    B, C, F, H, W = x_t.shape
    pt, ph, pw = _check_patch_size(patch_size)
    if model_out.dim() == 3:
        if F % pt or H % ph or W % pw:
            raise ValueError(f"x_t: shape {tuple(x_t.shape)} is not divisible by patch_size {tuple(patch_size)}")
        tokens = (B, (F // pt) * (H // ph) * (W // pw), pt * ph * pw * C)
        if tuple(model_out.shape) != tokens:
            raise ValueError(f"model_out: expected the latent shape {tuple(x_t.shape)} or the token layout {tokens} "
                             f"(patch_size {tuple(patch_size)}), got {tuple(model_out.shape)}")
    elif model_out.shape != x_t.shape:
        raise ValueError(f"model_out: expected the latent shape {tuple(x_t.shape)} or a token layout "
                         f"[B, tokens, channels], got {tuple(model_out.shape)}")
    sigma = _per_sample("sigma", sigma, B, x_t.device, high=1.0 if prediction != "eps" else 1.0 - 1e-7)
    if sigma_next is not None:
        sigma_next = _per_sample("sigma_next", sigma_next, B, x_t.device)
        if noise_seed is None:
            raise ValueError("noise_seed: required with sigma_next (the re-noising noise is keyed by it), got None")
    if noise_seed is not None:
        _check_seed(noise_seed)
    if prediction == "eps":
        if timestep is None:
            raise ValueError("timestep: required with prediction='eps' (LCM's boundary scalings), got None")
        timestep = _per_sample("timestep", timestep, B, x_t.device, high=float("inf"))
    check_frame_index(frame_index, x_t.device, limit=2 ** 63)
    frame_tensor = frame_index if isinstance(frame_index, torch.Tensor) else None
    outs = _outputs(out, x_t, sigma_next is not None)
    if x_t.numel():  # an empty latent launches nothing
        coef = _coefficients(prediction, sigma, sigma_next, timestep)
        seed = noise_seed or 0
        torch.ops.xjfast.denoise_step(x_t, model_out, coef, seed & 0xFFFFFFFF, seed >> 32,
                                      0 if frame_tensor is not None else frame_index, list(patch_size), backend,
                                      outs[0], outs[1], frame_tensor)
    return outs if sigma_next is not None else outs[0]


@torch.library.custom_op("xjfast::denoise_step", mutates_args=("x0", "x_next"), schema=(  # see xjfast::temporal_attention
    "(Tensor x_t, Tensor model_out, Tensor coef, SymInt seed_lo, SymInt seed_hi, SymInt frame_index, "
    "SymInt[] patch_size, str backend, Tensor(a8!) x0, Tensor(a9!)? x_next, Tensor? frame_tensor=None) -> ()"))
def _denoise_step_op(x_t: torch.Tensor, model_out: torch.Tensor, coef: torch.Tensor, seed_lo: int, seed_hi: int,
                     frame_index: int, patch_size: list[int], backend: str, x0: torch.Tensor,
                     x_next: torch.Tensor | None, frame_tensor: torch.Tensor | None = None) -> None:
    """The registered op (torch.compile / graph capture see one node); the seed travels as two
    32-bit halves because the schema's int is signed 64-bit. frame_tensor, when given, holds the
    frame index in device memory and replaces frame_index."""
    frame = frame_index if frame_tensor is None else frame_tensor
    args = (x_t, model_out, coef, seed_lo | (seed_hi << 32), frame, tuple(patch_size), x0, x_next)
    resolve("denoise_step", backend, x_t.device, args).fn(*args)


@_denoise_step_op.register_fake
def _(x_t, model_out, coef, seed_lo, seed_hi, frame_index, patch_size, backend, x0, x_next, frame_tensor=None):
    return None


def _outputs(out, x_t, with_next: bool):
    wanted = 2 if with_next else 1
    if out is None:
        outs = [torch.empty(x_t.shape, dtype=x_t.dtype, device=x_t.device) for _ in range(wanted)]
    else:
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        if len(outs) != wanted:
            raise ValueError(f"out: expected {'a pair (x0, x_next)' if with_next else 'one tensor'}, got {len(outs)}")
        for t in outs:
            check_tensor("out", t, dtypes=(x_t.dtype,), device=x_t.device)
            if t.shape != x_t.shape or not t.is_contiguous():
                raise ValueError(f"out: expected a contiguous tensor of shape {tuple(x_t.shape)}, got shape "
                                 f"{tuple(t.shape)} with strides {t.stride()}")
        if with_next and outs[0].numel() and _overlap(outs[0], outs[1]):
            raise ValueError("out: expected x0 and x_next in separate memory (both are written), got overlapping "
                             "tensors")
    return outs + [None] * (2 - wanted)


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two contiguous tensors share bytes of one storage."""
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    return a.data_ptr() < b.data_ptr() + b.nbytes and b.data_ptr() < a.data_ptr() + a.nbytes


def unpatchify(tokens: torch.Tensor, shape, patch_size) -> torch.Tensor:
    """[B, N, pt*ph*pw*C] tokens -> [B, C, F, H, W] latents (Wan2.1: 'bfhwpqrc->bcfphqwr')."""
    B, C, F, H, W = shape
    pt, ph, pw = patch_size
    x = tokens.reshape(B, F // pt, H // ph, W // pw, pt, ph, pw, C)
    return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(B, C, F, H, W)


@register("denoise_step", "reference")
def denoise_step_reference(x_t, model_out, coef, seed, frame_index, patch_size, x0, x_next):
    if model_out.dim() == 3:
        model_out = unpatchify(model_out, x_t.shape, patch_size)
    view = (-1, 1, 1, 1, 1)
    a, m, keep, noise = (c.view(view) for c in coef.unbind(1))
    pred = a * x_t.float() + m * model_out.float()
    x0.copy_(pred)
    if x_next is not None:
        eps = latent_noise(seed, frame_index, x_t.shape, x_t.device)
        x_next.copy_(keep * pred + noise * eps)


@register("denoise_step", "triton", min_capability=(8, 0),
          supports=lambda x_t, *_: grid_reason("Triton", "latent frames", x_t.shape[2]))
def denoise_step_triton(*args):
    from xjfast.kernels.denoise_step import denoise_step as launch
    launch(*args)


def _cuda_supports(x_t, model_out, *_) -> str | None:
    if reason := grid_reason("CUDA", "latent frames", x_t.shape[2]):  # what the bindings would raise
        return reason
    if max(x_t.shape) > 2**31 - 1:  # the bindings take the shape as C++ ints (x_t may be expanded: no memory behind)
        return f"the CUDA kernel takes latent sizes below 2^31, got shape {tuple(x_t.shape)}"
    if model_out.dtype != x_t.dtype:  # rounding model_out to x_t's dtype first would not be fp32 arithmetic
        return (f"the CUDA kernel reads model_out in x_t's dtype ({x_t.dtype}), got {model_out.dtype} "
                f"(backend='triton' reads both)")
    return None


@register("denoise_step", "cuda", min_capability=(8, 0), supports=_cuda_supports)
def denoise_step_cuda(x_t, model_out, coef, seed, frame_index, patch_size, x0, x_next):
    from xjfast.ops._cuda import DTYPE_CODES, extension, stream_handle
    coef = coef.to(x_t.device).contiguous()
    in_memory = isinstance(frame_index, torch.Tensor)  # read by the kernel through its pointer
    extension().denoise_step(
        x_t.data_ptr(), model_out.data_ptr(), coef.data_ptr(), x0.data_ptr(),
        x_next.data_ptr() if x_next is not None else 0, DTYPE_CODES[x_t.dtype], list(x_t.shape),
        list(x_t.stride()), list(model_out.stride()), model_out.dim() == 3, list(patch_size),
        0 if in_memory else frame_index, frame_index.data_ptr() if in_memory else 0, seed or 0,
        stream_handle(x_t.device))
