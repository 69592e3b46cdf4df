"""Kernel benchmarks side by side with what users would run instead.

Every implementation registered for an op (`xjfast.backends.implementations`) that can run here is
timed, so a backend registered tomorrow appears with no edit here; one that cannot run is recorded
with the reason. temporal_attention at the stream shapes (Wan2.1-1.3B: H=12, D=128, 1560-token
frames, 1 and 2 query frames, 3/6/12/21 cached frames; and head_dim 64): xjfast FP8 and bf16
against torch SDPA (flash / cuDNN / memory-efficient, bf16), FlexAttention with the same block mask
(compiled), and SageAttention / FlashInfer / flash-attn when importable. FLOPs are counted the same
way for all: 4 * B * H * D * (visible query-key pairs). Accuracy against a float64 reference sits
next to speed. Cache commit, compaction and denoise_step report GB/s and the fraction of the copy
bandwidth.
"""
from __future__ import annotations

import importlib.util
import time

import torch

import xjfast
from .harness import (accuracy, cuda_attention_core, environ, error_text, fail_if_context_lost, leave_out_name, on_gpu,
                      rate, time_ms)
from xjfast.backends import implementations, unusable_reason
from xjfast.errors import BackendUnavailable
from xjfast.ops.rotary import rotate_leading
from xjfast.ops.temporal_attention import CONFIG_ENV, SPLITS_ENV, block_mask

# The reference attention materialises fp32 scores of every (query, key) pair several times over
# (about 20 GB at 2 query frames over 21 cached ones) and takes seconds: it defines the op, the
# peers stand for what users run instead.
REFERENCE_ATTENTION_ON_GPU = "the float32 PyTorch definition is not timed at GPU shapes (it defines the op)"


def backends(op: str, device: torch.device) -> list[tuple[str, str | None]]:
    """(backend, None or why it cannot run here) for every registered implementation of `op`."""
    out = []
    for name in implementations(op):
        reason = unusable_reason(op, name, device)
        if reason is None and name == "reference" and op == "temporal_attention" and on_gpu(device):
            reason = REFERENCE_ATTENTION_ON_GPU
        out.append((name, reason))
    return out


# The stream shape (Wan2.1-1.3B at 480x832), and CI's tiny one; `xjfast bench --heads ...` replaces them.
DEFAULT_SHAPE = {"gpu": dict(heads=[12], head_dim=[128], frame_tokens=[1560], query_frames=[2, 1],
                             cached_frames=[12, 3, 21, 6]),
                 "cpu": dict(heads=[2], head_dim=[64], frame_tokens=[32], query_frames=[1, 2], cached_frames=[2])}


def attention_cases(gpu: bool, shape: dict | None = None):
    """Every combination of `shape`'s values (default: the stream shapes, plus head_dim 64 on a GPU).
    Most telling first (the engine's 2-frame pass), so a run cut short by its time budget keeps them."""
    custom = shape is not None
    shape = shape or DEFAULT_SHAPE["gpu" if gpu else "cpu"]
    [H], [T] = shape["heads"], shape["frame_tokens"]
    cases = [dict(H=H, D=D, T=T, query_frames=q, cached=c)
             for D in shape["head_dim"] for q in shape["query_frames"] for c in shape["cached_frames"]]
    if gpu and not custom:
        cases.append(dict(H=H, D=64, T=T, query_frames=2, cached=12))
    return cases


def _case_data(case, device, backend, seed):
    H, D, T, qf, cached = case["H"], case["D"], case["T"], case["query_frames"], case["cached"]
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape, bias=False):
        x = torch.randn(*shape, generator=g)
        if bias:  # real keys carry per-channel offsets: what K smoothing is for
            x = x + 2.0 * torch.randn(1, 1, H, D, generator=g)
        return x.to(device=device, dtype=torch.bfloat16)

    frames = [(rnd(1, T, H, D, bias=True), rnd(1, T, H, D)) for _ in range(cached)]
    cache = xjfast.StreamingKVCache(1, 1, H, D, T, sink_frames=1, window_frames=max(cached - 1, 1), device=device,
                                    backend=backend)
    for k, v in frames:
        cache.commit(0, k, v)
    q, k, v = rnd(1, qf * T, H, D), rnd(1, qf * T, H, D, bias=True), rnd(1, qf * T, H, D)
    return cache, frames, q, k, v


def _visible_pairs(Lq, n_cached, block_tokens):
    mask = block_mask(Lq, block_tokens)
    return Lq * n_cached + int(mask.sum())


def _frames_by_slot(frames, cache, dtype):
    """The cached frames' original (unquantized) keys with the rotary applied by slot, and values,
    in `dtype`: what a bf16 implementation that keeps the frames as they came attends to."""
    view, T = cache.view(0), cache.frame_tokens
    keys = [rotate_leading(fk.to(dtype), torch.full((T,), s, device=fk.device), view.rope_dims, view.rope_theta)
            .to(dtype) for s, (fk, _) in enumerate(frames)]
    return keys, [fv.to(dtype) for _, fv in frames]


def _exact(frames, q, k, v, cache, block_tokens):
    """float64 attention over the original (unquantized) keys with the rotary applied by slot."""
    view = cache.view(0)
    L, T = q.shape[1], cache.frame_tokens
    dims, theta = view.rope_dims, view.rope_theta
    ks, vs = _frames_by_slot(frames, cache, torch.float64)
    pos = view.num_slots + torch.arange(L, device=q.device) // T
    keys = torch.cat(ks + [rotate_leading(k.double(), pos, dims, theta)], 1)
    values = torch.cat(vs + [v.double()], 1)
    qr = rotate_leading(q.double(), pos, dims, theta).double()
    mask = torch.ones(L, keys.shape[1], dtype=torch.bool, device=q.device)
    mask[:, len(frames) * T:] = block_mask(L, block_tokens, device=q.device)
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    for h in range(q.shape[2]):  # one head at a time: the float64 scores of all heads may not fit
        s = (qr[0, :, h] @ keys[0, :, h].T) * q.shape[-1] ** -0.5
        out[0, :, h] = torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ values[0, :, h]
    return out


def _peers(case, cache, frames, q, k, v, block_tokens, gpu):
    """(name, callable or skip reason) for every implementation a user could run instead: bf16
    attention over the frames as they came (no FP8 cache), so their accuracy is their own."""
    view = cache.view(0)
    keys, values = _frames_by_slot(frames, cache, q.dtype)
    L, T = q.shape[1], cache.frame_tokens
    pos = view.num_slots + torch.arange(L, device=q.device) // T
    qr = rotate_leading(q, pos, view.rope_dims, view.rope_theta).to(q.dtype).transpose(1, 2).contiguous()
    kr = rotate_leading(k, pos, view.rope_dims, view.rope_theta).to(k.dtype)
    kk = torch.cat(keys + [kr], 1).transpose(1, 2).contiguous()
    vv = torch.cat(values + [v], 1).transpose(1, 2).contiguous()
    n_cached = kk.shape[2] - L
    masked = block_tokens is not None and block_tokens < L
    mask = torch.ones(L, kk.shape[2], dtype=torch.bool, device=q.device)
    if masked:
        mask[:, n_cached:] = block_mask(L, block_tokens, device=q.device)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def with_backend(b, use_mask):
        def run():
            with sdpa_kernel(b):
                return sdpa(qr, kk, vv, attn_mask=mask if use_mask else None).transpose(1, 2)
        return run

    peers = {}
    if not gpu:
        peers["torch-sdpa-math"] = with_backend(SDPBackend.MATH, masked)
        return peers
    peers["torch-sdpa-flash"] = with_backend(SDPBackend.FLASH_ATTENTION, False) if not masked else \
        "flash takes no block mask (a 2-frame pass needs one)"
    peers["torch-sdpa-cudnn"] = with_backend(SDPBackend.CUDNN_ATTENTION, masked)
    peers["torch-sdpa-efficient"] = with_backend(SDPBackend.EFFICIENT_ATTENTION, masked)
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        blocks = torch.cat([torch.full((n_cached,), -1, device=q.device),
                            torch.arange(L, device=q.device) // (block_tokens or L)])

        def mask_mod(b, h, q_idx, kv_idx):
            return blocks[kv_idx] <= q_idx // (block_tokens or L)
        bm = create_block_mask(mask_mod, 1, 1, L, kk.shape[2], device=q.device)
        _allow_recompiles()
        flex = torch.compile(flex_attention, dynamic=False)  # one static kernel per case, as users compile it
        peers["flex-attention"] = lambda: flex(qr, kk, vv, block_mask=bm).transpose(1, 2)
    except Exception as exc:
        peers["flex-attention"] = f"unavailable: {error_text(exc)}"
    peers.update(_libraries(*(t.transpose(1, 2).contiguous() for t in (qr, kk, vv)), mask if masked else None))
    return peers


# Peers whose products run in 8 bits (SageAttention: INT8 Q.K and, from sm_89, FP8 P.V): their
# fraction is of the FP8 GEMM ceiling, like xjfast's FP8 rows; of bf16's (half as high) it would
# flatter them 2x.
EIGHT_BIT_PEERS = ("sageattention",)


def _libraries(q, k, v, mask):
    """Attention libraries a user may have installed, on [B, L, H, D] inputs (rotated, bf16)."""
    peers = {}
    no_mask = "takes no block mask (a 2-frame pass needs one)"
    if importlib.util.find_spec("flash_attn") is None:
        peers["flash-attn"] = "not installed (flash_attn is not importable)"
    elif mask is not None:
        peers["flash-attn"] = f"flash-attn {no_mask}"
    else:
        from flash_attn import flash_attn_func
        peers["flash-attn"] = lambda: flash_attn_func(q, k, v)
    if importlib.util.find_spec("sageattention") is None:
        peers["sageattention"] = "not installed (sageattention is not importable)"
    elif mask is not None:
        peers["sageattention"] = f"SageAttention {no_mask}"
    else:
        from sageattention import sageattn
        peers["sageattention"] = lambda: sageattn(q, k, v, tensor_layout="NHD", is_causal=False)
    if importlib.util.find_spec("flashinfer") is None:
        peers["flashinfer"] = "not installed (flashinfer is not importable)"
    else:  # one sequence, NHD without the batch dimension; a boolean mask [Lq, Lk] where needed
        import flashinfer
        peers["flashinfer"] = lambda: flashinfer.single_prefill_with_kv_cache(
            q[0], k[0], v[0], custom_mask=mask)[None]
    return peers


def _allow_recompiles() -> None:
    """Each case is a new static shape for the compiled FlexAttention: without a higher limit,
    dynamo would give up after a few shapes and run the (slow, memory-hungry) eager path."""
    import torch._dynamo
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))


def _case_name(case: dict, precision: str | None = None) -> str:
    name = f"D{case['D']}-q{case['query_frames']}-cached{case['cached']}"
    return f"{name}-{precision}" if precision else name


def attention(device: torch.device, roof: dict, budget=None, shape: dict | None = None, keep=None) -> list[dict]:
    """One row per (case, implementation): timing, TFLOP/s and accuracy, or `skipped` with the reason.
    `budget()` (seconds left, or None) stops before a case that would not fit; `shape`: see
    attention_cases; `keep(rows)` is given the list the rows go into, first, then after each case
    (a section ended by an exception, or stopped from outside, keeps what it measured)."""
    gpu = on_gpu(device)
    ceilings = {name: roof.get(name, {}).get("TFLOP/s") for name in ("gemm_fp8", "gemm_bf16")}
    candidates = backends("temporal_attention", device)
    cache_backend = "auto" if gpu else "reference"
    rows, case_s = [], 0.0
    keep = keep or (lambda rows: None)
    keep(rows)
    for index, case in enumerate(attention_cases(gpu, shape)):
        left = budget() if budget else None
        if left is not None and case_s and left < 1.25 * case_s:  # the first (most telling) case always runs
            rows.append(dict(case, impl="*", skipped=f"out of the run's time budget ({left:.0f} s left)"))
            continue
        started = time.perf_counter()
        # the first case also times the Triton kernel in each candidate configuration (ranked by
        # bench/readme_tables.py: a GPU of that capability then runs the fastest)
        tuning_s = _attention_case(rows, case, device, candidates, cache_backend, ceilings, tune=index == 0)
        keep(rows)
        # the next case's estimate: this one's time less its tuning (the first case's compiles of
        # each configuration would otherwise leave every later case out of a short budget)
        case_s = time.perf_counter() - started - tuning_s
    return rows


def _attention_case(rows: list, case, device, candidates, cache_backend, ceilings: dict, tune=False) -> float:
    """Appends the case's rows to `rows`; returns the seconds spent on the tuning variants.
    `ceilings`: roofline name (gemm_fp8, gemm_bf16) -> TFLOP/s or None."""
    gpu = on_gpu(device)
    reps = 20 if gpu else 3
    sets = [_case_data(case, device, cache_backend, seed) for seed in (1, 2)]
    cache, frames, q, k, v = sets[0]
    T, L = case["T"], q.shape[1]
    block_tokens = T if case["query_frames"] > 1 else None
    n_cached = case["cached"] * T
    tflop = 4 * case["H"] * case["D"] * _visible_pairs(L, n_cached, block_tokens) / 1e12
    exact = _exact(frames, q, k, v, cache, block_tokens or L)
    tuning_s = 0.0
    for backend, reason, core, config, unsplit in _variants(candidates, device, tune):
        started = time.perf_counter()
        for precision in ("fp8",) if config or unsplit else ("fp8", "bf16"):
            label = f"{backend}[{core or config or 'unsplit'}]" if core or config or unsplit else backend
            row = dict(case, op="temporal_attention", case=_case_name(case, precision), backend=backend,
                       precision=precision, impl=f"xjfast-{label}-{precision}")
            if core:  # the fastest path ranks the backend and becomes auto's (bench/readme_tables.py)
                row.update(core=core)
            if config:  # ranked apart: the backend's own row is the configuration auto runs now
                row.update(config=config)
            if unsplit:  # what splitting the key units gains (kv_splits), ranked with nothing
                row.update(unsplit=True)
            if reason is not None:
                rows.append(dict(row, skipped=reason))
                continue

            def fn(c, q_, k_, v_, b=backend, p=precision):
                return xjfast.temporal_attention(q_, k_, v_, block_tokens=block_tokens, kv_cache=c, layer=0,
                                                 precision=p, backend=b)
            try:
                with cuda_attention_core(core), environ(CONFIG_ENV, config), environ(SPLITS_ENV, "1" if unsplit else None):
                    out = fn(cache, q, k, v)  # an implementation covering part of the op says so here
                    timing = time_ms(fn, [(s[0], s[2], s[3], s[4]) for s in sets], device, reps=reps)
                    if backend == "triton":
                        row.update(splits=_triton_splits(q, k, v, cache, block_tokens, precision))
                ceiling = f"gemm_{precision}"
                rows.append(dict(row, **rate(timing, tflop, "TFLOP/s", ceilings[ceiling]), ceiling=ceiling,
                                 **accuracy(out, exact)))
            except BackendUnavailable as exc:
                rows.append(dict(row, skipped=str(exc)))
            except Exception as exc:  # recorded; the other implementations' figures stand
                rows.append(dict(row, error=error_text(exc)))
                fail_if_context_lost(device, f"{row['impl']} {row['case']}",
                                     leave_out_name("temporal_attention", backend, core))
        if config or unsplit:
            tuning_s += time.perf_counter() - started
    for name, fn in _peers(case, cache, frames, q, k, v, block_tokens, gpu).items():
        row = dict(case, case=_case_name(case), impl=name)
        if isinstance(fn, str):
            rows.append(dict(row, skipped=fn))
            continue
        try:
            timing = time_ms(lambda: fn(), [()], device, reps=reps)
            ceiling = "gemm_fp8" if name in EIGHT_BIT_PEERS else "gemm_bf16"
            rows.append(dict(row, **rate(timing, tflop, "TFLOP/s", ceilings[ceiling]), ceiling=ceiling,
                             **accuracy(fn(), exact)))
        except Exception as exc:  # a peer that cannot run this case says why
            rows.append(dict(row, skipped=error_text(exc)))
            fail_if_context_lost(device, f"{name} {row['case']}")
    return tuning_s


def _triton_splits(q, k, v, cache, block_tokens, precision) -> int:
    """How many ways the Triton attention split the key units in this call."""
    from xjfast.backends import triton_interpreted
    from xjfast.kernels.temporal_attention import split_plan
    from xjfast.ops.temporal_attention import _validate
    plan = _validate(q, k, v, block_tokens, None, None, cache, 0, precision, "triton")
    return split_plan(q, plan, cache.view(0) if cache is not None else None, triton_interpreted())[0]


def _variants(candidates, device, tune: bool):
    """(backend, reason, CUDA path, Triton configuration, unsplit): on sm_90 the CUDA attention once
    per path side by side (wgmma, the warp-specialized TMA kernel ws, mma.sync), a path
    XJFAST_CUDA_ATTENTION_SKIP leaves out with the reason; elsewhere once (its one path). With
    `tune`, on a GPU, the Triton kernel also in each candidate configuration of the GPU's target,
    and once with its key units unsplit."""
    from xjfast.ops.temporal_attention import cuda_paths, skipped_cuda_paths
    gpu = on_gpu(device)
    hopper = gpu and torch.cuda.get_device_capability(device) == (9, 0)
    skipped = skipped_cuda_paths()
    for backend, reason in candidates:
        if backend == "triton" and reason is None and gpu and tune:
            from xjfast.kernels.temporal_attention import CANDIDATES, config_name, target
            for config in CANDIDATES[target(torch.cuda.get_device_capability(device))]:
                yield backend, None, None, config_name(config), False
            yield backend, None, None, None, True
        if backend != "cuda" or reason is not None or not hopper:
            yield backend, reason, None, None, False
            continue
        for core in cuda_paths(device):
            yield backend, ("left out: its first launch hung or failed in gpu-check (XJFAST_CUDA_ATTENTION_SKIP)"
                            if core in skipped else None), core, None, False


def _time_backends(rows: list, op: str, device, run, inputs, amount_gb: float, copy_bw: float, **row) -> None:
    """Appends to `rows` one row per registered implementation of `op`: GB/s of
    `run(backend, *inputs[i])`, or why not."""
    for backend, reason in backends(op, device):
        base = dict(op=op, backend=backend, impl=f"xjfast-{backend}", case=row.get("shape"), **row)
        if reason is not None:
            rows.append(dict(base, skipped=reason))
            continue
        try:
            timing = time_ms(lambda *a, b=backend: run(b, *a), inputs, device)
            rows.append(dict(base, **rate(timing, amount_gb, "GB/s", copy_bw)))
        except BackendUnavailable as exc:  # an implementation covering part of the op
            rows.append(dict(base, skipped=str(exc)))
        except Exception as exc:  # recorded; the other implementations' figures stand
            rows.append(dict(base, error=error_text(exc)))
            fail_if_context_lost(device, f"{op} {backend}", leave_out_name(op, backend))


def memory_bound(device: torch.device, roof: dict, shape: dict | None = None, keep=None) -> list[dict]:
    """kv_cache_commit, kv_cache_compact and denoise_step: GB/s and fraction of copy bandwidth, at
    the stream shape (a 480x832 frame: 1560 tokens of 12 heads x 128; 16 x 60 x 104 latents), or
    the cache ops at `shape`'s heads, frame tokens and (first) head_dim. `keep`: as attention's."""
    from xjfast.ops.denoise_step import denoise_step
    from xjfast.ops.kv_cache_commit import kv_cache_commit
    from xjfast.ops.kv_cache_compact import kv_cache_compact

    gpu = on_gpu(device)
    copy_bw = roof.get("copy", {}).get("GB/s")
    H, D, T, frames = (12, 128, 1560, 3) if gpu else (2, 64, 32, 1)
    if shape is not None:
        [H], D, [T] = shape["heads"], shape["head_dim"][0], shape["frame_tokens"]
    e4m3 = torch.float8_e4m3fn

    def fp8_random(*size):  # valid e4m3 values (never NaN bit patterns, never zeros)
        return torch.randn(*size, device=device).to(e4m3)

    rows = []
    keep = keep or (lambda rows: None)
    keep(rows)
    pages = [fp8_random(frames, 1, T, H, D) for _ in range(2)]
    scales = [torch.rand(frames, 1, H, device=device) + 0.5, torch.randn(frames, 1, H, D, device=device),
              torch.rand(frames, 1, H, D, device=device) + 0.5]
    ids = torch.arange(frames, dtype=torch.int32, device=device)
    inputs = [(torch.randn(1, frames * T, H, D, device=device, dtype=torch.bfloat16),
               torch.randn(1, frames * T, H, D, device=device, dtype=torch.bfloat16)) for _ in range(3)]
    # bf16 K, V in; e4m3 pages and their scales (k_scale, k_mean, v_scale) out: counted from the tensors
    gb = sum(t.nbytes for t in (*inputs[0], *pages, *scales)) / 1e9
    _time_backends(rows, "kv_cache_commit", device,
                   lambda b, k, v: kv_cache_commit(k, v, pages[0], pages[1], *scales, ids, backend=b),
                   inputs, gb, copy_bw, shape=f"{frames}x[{T},{H},{D}]")

    K = 512 if gpu else 16
    buffer = [fp8_random(1, K, H, D), fp8_random(1, K, H, D), torch.rand(1, H, device=device) + 0.5,
            torch.randn(1, H, D, device=device), torch.rand(1, H, D, device=device) + 0.5]
    page = [pages[0][0], pages[1][0], scales[0][0], scales[1][0], scales[2][0]]
    keep_mass = torch.rand(1, K, device=device)
    mass = torch.rand(1, T, device=device)
    # the K selected candidates' K and V read once, the keep buffer's K and V written once (the
    # other T candidates are never read: counting them would flatter the figure ~3x)
    gb = (2 * K * H * D + 2 * K * H * D) / 1e9
    _time_backends(rows, "kv_cache_compact", device,
                   lambda b: kv_cache_compact(buffer, keep_mass, K, page, mass, backend=b),
                   [()], gb, copy_bw, shape=f"keep {K} + page [{T},{H},{D}]")

    # the stream's step (3 latent frames: launch-bound, a few microseconds), and 4 x 21 frames,
    # where the kernel's bandwidth shows
    for shape in ((1, 16, 3, 60, 104), (4, 16, 21, 60, 104)) if gpu else ((1, 4, 1, 16, 16),):
        lat = [torch.randn(shape, device=device, dtype=torch.bfloat16) for _ in range(3)]
        tokens = [torch.randn(shape[0], shape[2] * shape[3] * shape[4] // 4, 4 * shape[1], device=device,
                              dtype=torch.bfloat16) for _ in range(3)]
        gb = 4 * lat[0].numel() * 2 / 1e9  # x_t and model_out in, x0 and x_next out, bf16
        _time_backends(rows, "denoise_step", device,
                       lambda b, x, m: denoise_step(x, m, 0.8, 0.4, noise_seed=3, frame_index=100, backend=b),
                       list(zip(lat, tokens)), gb, copy_bw, shape=str(shape))
    return rows
