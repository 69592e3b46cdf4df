"""One small launch of every GPU kernel of every GPU backend, for compute-sanitizer (memcheck,
racecheck). Backends come from the registry, so a kernel registered tomorrow is checked with no
edit here; what cannot run says why. Shapes are small and not multiples of the tiles, so the
tails are exercised. Run under PYTORCH_NO_CUDA_MEMORY_CACHING=1: each tensor is then its own
allocation, and an out-of-bounds access cannot land unseen in a neighbour inside torch's pool.

    compute-sanitizer --tool memcheck python -m bench.sanitize

Without a GPU, tests/test_sanitize.py runs the same launches on xjfast._C's CPU build compiled with
AddressSanitizer (tests/simt_memcheck.py).
"""
from __future__ import annotations

import sys

import torch

import xjfast
from .harness import cuda_attention_core, environ
from xjfast.backends import implementations, registered_ops, unusable_reason
from xjfast.errors import BackendUnavailable
from xjfast.ops.denoise_step import denoise_step
from xjfast.ops.kv_cache_commit import kv_cache_commit
from xjfast.ops.kv_cache_compact import kv_cache_compact
from xjfast.ops.temporal_attention import SPLITS_ENV, cuda_core, cuda_paths, skipped_cuda_paths

H, D, T, KEEP = 2, 128, 80, 24  # frames of 80 tokens: not a multiple of the 64-token tiles
E4M3 = torch.float8_e4m3fn


def _stored(device, tokens, dtype=E4M3):
    """(k, v, k_scale, k_mean, v_scale) of one unit: valid storage values and positive scales."""
    return [torch.randn(1, tokens, H, D, device=device).to(dtype) for _ in range(2)] + [
        torch.rand(1, H, device=device) + 0.5, torch.randn(1, H, D, device=device),
        torch.rand(1, H, D, device=device) + 0.5]


def launches(op: str, backend: str, device) -> list[tuple[str, callable]]:
    """(label, call) for each small launch of `op` on `backend`."""
    def bf16(*shape):
        return torch.randn(*shape, device=device, dtype=torch.bfloat16)

    if op == "kv_cache_commit":
        def commit(tokens, pages, ids):  # frames of `tokens` into pages `ids` of `pages`
            stored = [torch.randn(pages, 1, tokens, H, D, device=device).to(E4M3) for _ in range(2)]
            scales = [torch.empty(pages, 1, H, device=device), torch.empty(pages, 1, H, D, device=device),
                      torch.empty(pages, 1, H, D, device=device)]
            page_ids = torch.tensor(ids, dtype=torch.int32, device=device)
            return lambda: kv_cache_commit(bf16(1, len(ids) * tokens, H, D), bf16(1, len(ids) * tokens, H, D),
                                           *stored, *scales, page_ids, backend=backend)
        # the CUDA kernel: a CTA per short frame; a 300-token frame over a cluster of 3
        return [("two frames into pages 2 and 0", commit(T, 3, [2, 0])),
                ("a 300-token frame into page 1", commit(300, 2, [1]))]
    if op == "kv_cache_compact":
        def compact(slots, kept, dtype=E4M3):  # `kept` of `slots` in use, then a page of T tokens
            keep, page = _stored(device, slots, dtype), _stored(device, T, dtype)
            return lambda: kv_cache_compact(keep, torch.rand(1, slots, device=device), kept, page,
                                            torch.rand(1, T, device=device), backend=backend)
        # the CUDA kernel: one CTA; a cluster of 3; one unstaged CTA (fp32 rows beyond shared memory) whose
        # full buffer moves its kept slots down as the page's tokens displace some
        return [("a page into a half-full keep buffer", compact(KEEP, KEEP // 2)),
                ("150 slots (3 chunks)", compact(150, 100)),
                ("1400 fp32 slots, full", compact(1400, 1400, torch.float32))]
    if op == "denoise_step":
        x = bf16(1, 16, 2, 10, 14)
        return [("head tokens, re-noised", lambda: denoise_step(x, bf16(1, 2 * 5 * 7, 64), 0.7, 0.3, noise_seed=1,
                                                                 frame_index=5, backend=backend)),
                ("latent layout", lambda: denoise_step(x, bf16(1, 16, 2, 10, 14), 0.7, backend=backend))]
    if op == "temporal_attention":
        # a cache through eviction and compaction (keep buffer, attention mass), filled by the
        # reference: a hang in another backend's commit must not count against the attention
        cache = xjfast.StreamingKVCache(1, 1, H, D, T, sink_frames=1, window_frames=2, keep_tokens=KEEP, device=device,
                                        backend="reference")
        for _ in range(4):
            cache.commit(0, bf16(1, T, H, D), bf16(1, T, H, D))
        q, k, v = (bf16(1, 2 * T, H, D) for _ in range(3))
        out = []
        if backend == "cuda":
            # the launches below run the default path (cuda_core): every other path this GPU runs
            # gets its own, but one whose first launch hung or failed in gpu_check.sh
            def with_core(core):
                with cuda_attention_core(core):
                    return xjfast.temporal_attention(q, k, v, block_tokens=T, private_blocks=[False, True],
                                                     kv_cache=cache, layer=0, backend=backend)
            for core in cuda_paths(device):
                if core != cuda_core(device) and core not in skipped_cuda_paths():
                    out.append((f"fp8, cache with keep buffer, {core} path", lambda c=core: with_core(c)))
        if backend == "triton":  # small grids split the key units (kv_splits): once unsplit too
            def unsplit():
                with environ(SPLITS_ENV, "1"):
                    return xjfast.temporal_attention(q, k, v, block_tokens=T, private_blocks=[False, True],
                                                     kv_cache=cache, layer=0, backend=backend)
            out.append(("fp8, cache with keep buffer, key units unsplit", unsplit))
        for precision in ("fp8", "bf16"):
            out.append((f"{precision}, cache with keep buffer, private block", lambda p=precision: xjfast.temporal_attention(
                q, k, v, block_tokens=T, private_blocks=[False, True], kv_cache=cache, layer=0, precision=p,
                backend=backend)))
            out.append((f"{precision}, no cache", lambda p=precision: xjfast.temporal_attention(
                q, k, v, block_tokens=T, precision=p, backend=backend)))
        return out
    raise KeyError(op)


def main(device="cuda", backends=None) -> int:
    torch.manual_seed(0)
    failed = 0
    for op in registered_ops():
        for backend in backends or [b for b in implementations(op) if b != "reference"]:
            reason = unusable_reason(op, backend, device)
            if reason is not None:
                print(f"sanitize {op}/{backend}: not launched ({reason})")
                continue
            try:
                calls = launches(op, backend, device)
            except KeyError:
                failed += 1
                print(f"sanitize {op}: FAILED: bench/sanitize.py defines no small launch for this op")
                break
            for label, call in calls:
                try:
                    call()
                    if device == "cuda":
                        torch.cuda.synchronize()
                    print(f"sanitize {op}/{backend} ({label}): launched")
                except BackendUnavailable as exc:  # an implementation covering part of the op
                    print(f"sanitize {op}/{backend} ({label}): not covered ({exc})")
                except Exception as exc:  # the others still run; the exit status tells
                    failed += 1
                    print(f"sanitize {op}/{backend} ({label}): FAILED {type(exc).__name__}: {exc}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
