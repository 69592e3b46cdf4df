"""One small launch of every GPU kernel, for compute-sanitizer (memcheck, racecheck)."""
from __future__ import annotations

import torch

import xjfast
from xjfast.ops.denoise_step import denoise_step


def main() -> None:
    device = torch.device("cuda")
    torch.manual_seed(0)
    H, D, T = 2, 128, 80  # a frame that is not a multiple of the tiles: the tails are exercised
    cache = xjfast.StreamingKVCache(1, 1, H, D, T, sink_frames=1, window_frames=2, keep_tokens=24, device=device)
    for _ in range(4):  # commit, eviction and compaction
        cache.commit(0, torch.randn(1, T, H, D, device=device, dtype=torch.bfloat16),
                     torch.randn(1, T, H, D, device=device, dtype=torch.bfloat16))
        q, k, v = (torch.randn(1, 2 * T, H, D, device=device, dtype=torch.bfloat16) for _ in range(3))
        for precision in ("fp8", "bf16"):
            xjfast.temporal_attention(q, k, v, block_tokens=T, private_blocks=[False, True], kv_cache=cache,
                                      layer=0, precision=precision)
    xjfast.temporal_attention(q, k, v, block_tokens=T)  # no cache
    x = torch.randn(1, 16, 2, 10, 14, device=device, dtype=torch.bfloat16)
    denoise_step(x, torch.randn(1, 2 * 5 * 7, 64, device=device, dtype=torch.bfloat16), 0.7, 0.3, noise_seed=1)
    torch.cuda.synchronize()
    print("sanitize: every kernel launched")


if __name__ == "__main__":
    main()
