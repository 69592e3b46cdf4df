"""Kernel benchmarks side by side with what users would run instead.

temporal_attention at the stream shapes (Wan2.1-1.3B: H=12, D=128, 1560-token frames, 1 and 2
query frames, 3/6/12/21 cached frames; and head_dim 64): xjfast FP8 and bf16 against torch SDPA
(flash / cuDNN / memory-efficient, bf16), FlexAttention with the same block mask (compiled), and
SageAttention / FlashInfer / flash-attn when importable. FLOPs are counted the same way for all:
4 * B * H * D * (visible query-key pairs). Accuracy against a float64 reference sits next to speed.
Cache commit, compaction and denoise_step report GB/s and the fraction of the copy bandwidth.
"""
from __future__ import annotations

import importlib.util

import torch

import xjfast
from bench.baseline import cached_keys_values
from bench.harness import accuracy, on_gpu, rate, time_ms
from xjfast.ops.rotary import rotate_leading
from xjfast.ops.temporal_attention import block_mask


def attention_cases(gpu: bool):
    if not gpu:  # CI: tiny shapes, reference backend
        return [dict(H=2, D=64, T=32, query_frames=q, cached=2) for q in (1, 2)]
    cases = [dict(H=12, D=128, T=1560, query_frames=q, cached=c) for q in (1, 2) for c in (3, 6, 12, 21)]
    return cases + [dict(H=12, D=64, T=1560, query_frames=2, cached=12)]


def _case_data(case, device, backend, seed):
    H, D, T, qf, cached = case["H"], case["D"], case["T"], case["query_frames"], case["cached"]
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape, bias=False):
        x = torch.randn(*shape, generator=g)
        if bias:  # real keys carry per-channel offsets: what K smoothing is for
            x = x + 2.0 * torch.randn(1, 1, H, D, generator=g)
        return x.to(device=device, dtype=torch.bfloat16)

    frames = [(rnd(1, T, H, D, bias=True), rnd(1, T, H, D)) for _ in range(cached)]
    cache = xjfast.StreamingKVCache(1, 1, H, D, T, sink_frames=1, window_frames=cached - 1, device=device,
                                    backend=backend)
    for k, v in frames:
        cache.commit(0, k, v)
    q, k, v = rnd(1, qf * T, H, D), rnd(1, qf * T, H, D, bias=True), rnd(1, qf * T, H, D)
    return cache, frames, q, k, v


def _visible_pairs(Lq, n_cached, block_tokens):
    mask = block_mask(Lq, block_tokens)
    return Lq * n_cached + int(mask.sum())


def _exact(frames, q, k, v, cache, block_tokens):
    """float64 attention over the original (unquantized) keys with the rotary applied by slot."""
    view = cache.view(0)
    L, T = q.shape[1], cache.frame_tokens
    dims, theta = view.rope_dims, view.rope_theta
    ks = [rotate_leading(fk.double(), torch.full((T,), s, device=q.device), dims, theta)
          for s, (fk, _) in enumerate(frames)]
    pos = view.num_slots + torch.arange(L, device=q.device) // T
    keys = torch.cat(ks + [rotate_leading(k.double(), pos, dims, theta)], 1)
    values = torch.cat([fv.double() for _, fv in frames] + [v.double()], 1)
    qr = rotate_leading(q.double(), pos, dims, theta).double()
    mask = torch.ones(L, keys.shape[1], dtype=torch.bool, device=q.device)
    mask[:, len(frames) * T:] = block_mask(L, block_tokens, device=q.device)
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    for h in range(q.shape[2]):  # one head at a time: the float64 scores of all heads may not fit
        s = (qr[0, :, h] @ keys[0, :, h].T) * q.shape[-1] ** -0.5
        out[0, :, h] = torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ values[0, :, h]
    return out


def _peers(case, cache, q, k, v, block_tokens, gpu):
    """(name, callable or skip reason) for every implementation a user could run instead."""
    view = cache.view(0)
    keys, values = cached_keys_values(view, q.dtype)
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
        flex = torch.compile(flex_attention)
        peers["flex-attention"] = lambda: flex(qr, kk, vv, block_mask=bm).transpose(1, 2)
    except Exception as exc:
        peers["flex-attention"] = f"unavailable: {type(exc).__name__}: {exc}"
    for name, module in (("sageattention", "sageattention"), ("flashinfer", "flashinfer"),
                         ("flash-attn", "flash_attn")):
        if importlib.util.find_spec(module) is None:
            peers[name] = f"not installed ({module} is not importable)"
    return peers


def attention(device: torch.device, roof: dict) -> list[dict]:
    gpu = on_gpu(device)
    backend = "auto" if gpu else "reference"
    fp8_ceiling = roof.get("gemm_fp8", {}).get("TFLOP/s")
    bf16_ceiling = roof.get("gemm_bf16", {}).get("TFLOP/s")
    rows = []
    for case in attention_cases(gpu):
        sets = [_case_data(case, device, backend, seed) for seed in (1, 2)]
        cache, frames, q, k, v = sets[0]
        T, L = case["T"], q.shape[1]
        block_tokens = T if case["query_frames"] > 1 else None
        n_cached = case["cached"] * T
        tflop = 4 * case["H"] * case["D"] * _visible_pairs(L, n_cached, block_tokens) / 1e12
        exact = _exact(frames, q, k, v, cache, block_tokens or L)
        impls = {}
        for precision in ("fp8", "bf16"):
            impls[f"xjfast-{precision}"] = (
                lambda c, q_, k_, v_, p=precision: xjfast.temporal_attention(
                    q_, k_, v_, block_tokens=block_tokens, kv_cache=c, layer=0, precision=p, backend=backend))
        for name, fn in impls.items():
            timing = time_ms(fn, [(s[0], s[2], s[3], s[4]) for s in sets], device, reps=20 if gpu else 3)
            row = dict(case, impl=name, **rate(timing, tflop, "TFLOP/s", fp8_ceiling if "fp8" in name else bf16_ceiling),
                       **accuracy(fn(cache, q, k, v), exact))
            rows.append(row)
        for name, fn in _peers(case, cache, q, k, v, block_tokens, gpu).items():
            if isinstance(fn, str):
                rows.append(dict(case, impl=name, skipped=fn))
                continue
            try:
                timing = time_ms(lambda: fn(), [()], device, reps=20 if gpu else 3)
                rows.append(dict(case, impl=name, **rate(timing, tflop, "TFLOP/s", bf16_ceiling), **accuracy(fn(), exact)))
            except Exception as exc:  # a peer that cannot run this case says why
                rows.append(dict(case, impl=name, skipped=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"))
    return rows


def memory_bound(device: torch.device, roof: dict) -> list[dict]:
    """kv_cache_commit, kv_cache_compact and denoise_step: GB/s and fraction of copy bandwidth."""
    from xjfast.ops.denoise_step import denoise_step
    from xjfast.ops.kv_cache_commit import kv_cache_commit
    from xjfast.ops.kv_cache_compact import kv_cache_compact

    gpu = on_gpu(device)
    backend = "auto" if gpu else "reference"
    copy_bw = roof["copy"]["GB/s"]
    H, D, T, frames = (12, 128, 1560, 3) if gpu else (2, 64, 32, 1)
    rows = []
    pages = [torch.empty(frames, 1, T, H, D, dtype=torch.float8_e4m3fn, device=device) for _ in range(2)]
    scales = [torch.empty(frames, 1, H, device=device), torch.empty(frames, 1, H, D, device=device),
              torch.empty(frames, 1, H, D, device=device)]
    ids = torch.arange(frames, dtype=torch.int32, device=device)
    inputs = [(torch.randn(1, frames * T, H, D, device=device, dtype=torch.bfloat16),
               torch.randn(1, frames * T, H, D, device=device, dtype=torch.bfloat16)) for _ in range(3)]
    gb = (frames * T * H * D * (2 * 2 + 2 * 1) + frames * H * D * 8) / 1e9  # bf16 K,V in; e4m3 K,V + scales out
    t = time_ms(lambda k, v: kv_cache_commit(k, v, pages[0], pages[1], *scales, ids, backend=backend), inputs, device)
    rows.append(dict(op="kv_cache_commit", shape=f"{frames}x[{T},{H},{D}]", **rate(t, gb, "GB/s", copy_bw)))

    K = 512 if gpu else 16
    keep = [torch.zeros(1, K, H, D, dtype=torch.float8_e4m3fn, device=device) for _ in range(2)] + \
        [torch.ones(1, H, device=device), torch.zeros(1, H, D, device=device), torch.ones(1, H, D, device=device)]
    page = [pages[0][0], pages[1][0], scales[0][0], scales[1][0], scales[2][0]]
    keep_mass = torch.rand(1, K, device=device)
    mass = torch.rand(1, T, device=device)
    gb = (2 * (K + T) * H * D + 2 * K * H * D) / 1e9  # candidates read twice at most, keep written once
    t = time_ms(lambda: kv_cache_compact(keep, keep_mass, K, page, mass, backend=backend), [()], device)
    rows.append(dict(op="kv_cache_compact", shape=f"keep {K} + page [{T},{H},{D}]", **rate(t, gb, "GB/s", copy_bw)))

    shape = (1, 16, 3, 60, 104) if gpu else (1, 4, 1, 16, 16)
    lat = [torch.randn(shape, device=device, dtype=torch.bfloat16) for _ in range(3)]
    tokens = [torch.randn(1, shape[2] * shape[3] * shape[4] // 4, 4 * shape[1], device=device, dtype=torch.bfloat16)
              for _ in range(3)]
    numel = lat[0].numel()
    gb = 4 * numel * 2 / 1e9  # x_t and model_out in, x0 and x_next out, bf16
    t = time_ms(lambda x, m: denoise_step(x, m, 0.8, 0.4, noise_seed=3, frame_index=100, backend=backend),
                list(zip(lat, tokens)), device)
    rows.append(dict(op="denoise_step", shape=str(shape), **rate(t, gb, "GB/s", copy_bw)))
    return rows
