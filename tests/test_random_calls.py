"""Every fast backend against the reference on random valid calls: shapes, dtypes, precisions, mask
blocks, private blocks, caches (sinks, windows, keep buffers, storages, rotary widths, fill levels)
and speculative frame slots and lags drawn together, as users combine them. Each case's settings are fixed
by its seed; its tensors are fresh."""
import random

import pytest
import torch

from xjfast import StreamingKVCache
from xjfast.ops.temporal_attention import mass_values

from backends import DEVICE, fast_backends
from test_temporal_attention import SIM_REL_L2, qkv, rel_l2, run_backend, uncovered


def attention_call(seed: int) -> dict:
    r = random.Random(seed)
    D, T, frames = r.choice([64, 128]), r.choice([16, 24, 40, 80]), r.choice([1, 2, 3, 4])  # 80: whole + partial tiles
    call = dict(B=r.choice([1, 2]), H=r.choice([1, 2, 3]), D=D, T=T, frames=frames,
                dtype=r.choice([torch.bfloat16, torch.float16]), kwargs=dict(precision=r.choice(["fp8", "fp8", "bf16"])),
                cache=None)
    if r.random() < 0.8:
        call["kwargs"]["block_tokens"] = T
        if r.random() < 0.5:
            call["kwargs"]["private_blocks"] = tuple(r.random() < 0.4 for _ in range(frames))
    if r.random() < 0.6:
        call["cache"] = dict(sink_frames=r.choice([0, 1, 2]), window_frames=r.choice([1, 2, 3]),
                             keep_tokens=r.choice([0, 0, 8, 20]), storage=r.choice(["fp8", "fp8", "bf16"]),
                             rope_dims=r.choice([None, 0, 2 * r.randint(1, D // 2)]))
        call["commits"] = r.choice([0, 1, 3, 6])
        if "block_tokens" in call["kwargs"] and r.random() < 0.3:
            slots = [0]
            for _ in range(frames - 1):
                slots.append(slots[-1] + r.choice([0, 1]))  # a draft and a noisy block share a slot
            call["kwargs"]["frame_slots"] = tuple(slots)
        held = min(call["commits"], call["cache"]["sink_frames"] + call["cache"]["window_frames"])
        window_held = held - min(held, call["cache"]["sink_frames"])
        if window_held and r.random() < 0.4:  # a drafted pass: its later frames see the cache of a later pass
            call["kwargs"]["frame_lags"] = tuple(sorted(r.randint(0, window_held) for _ in range(frames)))
    return call


def filled(call, seed):
    torch.manual_seed(seed)  # the two caches alike: one per backend
    B, H, D, T = call["B"], call["H"], call["D"], call["T"]
    cache = StreamingKVCache(1, B, H, D, T, device=DEVICE, **call["cache"])
    for _ in range(call["commits"]):
        cache.commit(0, (torch.randn(B, T, H, D, device=DEVICE) + 2).bfloat16(),
                     torch.randn(B, T, H, D, device=DEVICE).bfloat16())
    return cache


@pytest.mark.parametrize("backend", fast_backends("temporal_attention"))
@pytest.mark.parametrize("seed", range(24))
def test_attention_matches_the_reference_on_random_calls(backend, seed):
    call = attention_call(seed)
    q, k, v = (t.to(DEVICE, call["dtype"]) for t in qkv(B=call["B"], L=call["T"] * call["frames"], H=call["H"],
                                                         D=call["D"]))
    caches = [filled(call, seed) for _ in range(2)] if call["cache"] else [None, None]
    if uncovered(backend, q, k, v, caches[0], **call["kwargs"]) is not None:
        pytest.skip(f"{backend} does not cover this call (test_temporal_attention checks the refusal)")
    out, lse = run_backend(backend, q, k, v, caches[0], **call["kwargs"])
    ref, ref_lse = run_backend("reference", q, k, v, caches[1], simulate=backend, **call["kwargs"])
    assert out.isfinite().all() and lse.isfinite().all(), call
    assert rel_l2(out, ref.double()) <= SIM_REL_L2, call
    assert (lse - ref_lse).abs().max() < 5e-3, call
    if caches[0] is not None and caches[0].mass is not None:
        assert torch.allclose(mass_values(caches[0].mass), mass_values(caches[1].mass), rtol=1e-3, atol=1e-5), call
