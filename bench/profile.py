"""One launch of an op at the stream shape (Wan2.1-1.3B, 480x832) between cudaProfilerStart and
cudaProfilerStop, for Nsight Compute: `make profile OP=temporal_attention [BACKEND=triton]` runs

    ncu --profile-from-start off --clock-control none --set full -o $OUT/profile-OP python -m bench.profile OP BACKEND

Warm-up calls come first, outside the profiled range, so that compilation and autotuning stay out.
One path of the CUDA attention: `XJFAST_CUDA_ATTENTION_CORE=ws make profile OP=temporal_attention BACKEND=cuda`;
one configuration of the Triton attention: `XJFAST_TRITON_ATTENTION_CONFIG=64,32,4,2 make profile ... BACKEND=triton`.
"""
from __future__ import annotations

import sys

import torch

import xjfast
from xjfast.backends import registered_ops
from xjfast.ops.denoise_step import denoise_step
from xjfast.ops.kv_cache_commit import kv_cache_commit
from xjfast.ops.kv_cache_compact import kv_cache_compact

H, D, T = 12, 128, 1560  # one latent frame of Wan2.1-1.3B at 480x832: 1560 tokens, 12 heads of 128
E4M3 = torch.float8_e4m3fn


def stream_shape_call(op: str, backend: str):
    """A no-argument call of `op` on `backend` at the stream shape."""
    dev = "cuda"

    def bf16(*shape):
        return torch.randn(*shape, device=dev, dtype=torch.bfloat16)

    if op == "temporal_attention":  # the engine's pass: [clean | noisy] frames over 1 sink + 8 window frames
        cache = xjfast.StreamingKVCache(1, 1, H, D, T, sink_frames=1, window_frames=8, device=dev)
        for _ in range(9):
            cache.commit(0, bf16(1, T, H, D), bf16(1, T, H, D))
        q, k, v = (bf16(1, 2 * T, H, D) for _ in range(3))
        return lambda: xjfast.temporal_attention(q, k, v, block_tokens=T, private_blocks=[False, True],
                                                 kv_cache=cache, layer=0, backend=backend)
    if op == "kv_cache_commit":
        pages = [torch.randn(9, 1, T, H, D, device=dev).to(E4M3) for _ in range(2)]
        scales = [torch.empty(9, 1, H, device=dev), torch.empty(9, 1, H, D, device=dev),
                  torch.empty(9, 1, H, D, device=dev)]
        k, v, ids = bf16(1, T, H, D), bf16(1, T, H, D), torch.tensor([4], dtype=torch.int32, device=dev)
        return lambda: kv_cache_commit(k, v, *pages, *scales, ids, backend=backend)
    if op == "kv_cache_compact":
        def unit(tokens):
            return [torch.randn(1, tokens, H, D, device=dev).to(E4M3) for _ in range(2)] + [
                torch.rand(1, H, device=dev) + 0.5, torch.randn(1, H, D, device=dev), torch.rand(1, H, D, device=dev)]
        keep, page = unit(512), unit(T)
        keep_mass, mass = torch.rand(1, 512, device=dev), torch.rand(1, T, device=dev)
        return lambda: kv_cache_compact(keep, keep_mass, 512, page, mass, backend=backend)
    if op == "denoise_step":
        x, tokens = bf16(1, 16, 1, 60, 104), bf16(1, 1560, 64)
        return lambda: denoise_step(x, tokens, 0.8, 0.4, noise_seed=3, frame_index=100, backend=backend)
    raise ValueError(f"OP: expected one of {', '.join(registered_ops())}, got {op!r}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        raise SystemExit(f"usage: python -m bench.profile OP [BACKEND]  (OP: {', '.join(registered_ops())})")
    op, backend = argv[0], argv[1] if len(argv) > 1 else "auto"
    torch.manual_seed(0)
    call = stream_shape_call(op, backend)
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    call()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    print(f"profiled one {op} call (backend={backend})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
