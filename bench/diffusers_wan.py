"""The drop-in speedup: a Wan2.1-1.3B-shaped diffusers WanTransformer3DModel forward (bf16, random
weights, 480x832) with `xjfast.integrations.diffusers.enable(model)` against diffusers' default
attention (torch SDPA), timed in the same run, with the output difference next to the speed.

diffusers is optional: without it the section says so and measures nothing. gpu_check.sh installs
the wheels that bench/fetch_wheels.sh saved into .whl/ (the GPU machine has no internet).
"""
from __future__ import annotations

import importlib.util
import time

import torch

from .harness import accuracy, error_text, fail_if_context_lost, on_gpu, time_ms

# Wan2.1-T2V-1.3B's transformer config (diffusers layout).
WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
# CPU mode: the same model class, small enough for CI.
TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64, in_channels=4, out_channels=4,
            text_dim=32, freq_dim=32, ffn_dim=128, num_layers=2, rope_max_seq_len=64)
TEXT_TOKENS = 512


def cases(gpu: bool) -> list[dict]:
    """Latent frames at 480x832 (60x104 latents): one frame (the streaming step), three, and 21
    (an 81-frame clip, where attention dominates)."""
    if not gpu:
        return [dict(latent_frames=1, latent_hw=(8, 8))]
    return [dict(latent_frames=f, latent_hw=(60, 104)) for f in (1, 3, 21)]


def _cast_like_from_pretrained(model, dtype) -> None:
    """What from_pretrained(torch_dtype=dtype) does: every floating tensor in dtype except those of
    the modules the model class keeps in float32 (rotary tables, time embedding, modulation, norms)."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.is_floating_point() and not keep & set(name.split(".")):
            tensor.data = tensor.data.to(dtype)
    model.eval()


def measure(device: torch.device, log, budget=None, keep=None) -> dict:
    """The forward of a Wan-shaped diffusers transformer with its default attention and with
    xjfast's (`enable()`), per clip length. `keep(out)` is given the section's results first (a
    section ended by an exception keeps what it measured)."""
    if importlib.util.find_spec("diffusers") is None:
        return {"skipped": "diffusers is not installed (pip install 'xjfast[diffusers]'; for a GPU machine "
                           "without internet, a checkout's bench/fetch_wheels.sh saves the wheels and "
                           "gpu_check.sh installs them)"}
    import diffusers

    from xjfast.integrations import diffusers as xjd
    from xjfast.integrations.sdpa import fallback_counts, reset_fallback_counts

    gpu = on_gpu(device)
    config = WAN_1_3B if gpu else TINY
    dtype = torch.bfloat16 if gpu else torch.float32
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: 1.3B parameters, no host round trip
        model = diffusers.WanTransformer3DModel(**config)
    _cast_like_from_pretrained(model, dtype)
    backend = "auto" if gpu else "reference"  # on the CPU only xjfast's reference takes the calls
    precisions = ("fp8", "bf16") if gpu else ("bf16",)
    out = {"diffusers": diffusers.__version__, "model": "WanTransformer3DModel, Wan2.1-1.3B config" if gpu else
           "WanTransformer3DModel, tiny config", "dtype": str(dtype).removeprefix("torch."), "rows": []}
    if keep is not None:
        keep(out)
    last = None  # (seconds, latent frames) of the last case run
    for case in cases(gpu):
        left = budget() if budget else None
        # the next case's time from the last one's, as if all attention (the square of the tokens):
        # an upper bound, so that the 21-frame clip does not eat into the stream's time
        if left is not None and last and left < last[0] * (case["latent_frames"] / last[1]) ** 2:
            out["rows"].append(dict(case, skipped=f"out of the run's time budget ({left:.0f} s left)"))
            continue
        started = time.perf_counter()
        g = torch.Generator(device="cpu").manual_seed(case["latent_frames"])
        x = torch.randn(1, config["in_channels"], case["latent_frames"], *case["latent_hw"], generator=g)
        text = torch.randn(1, TEXT_TOKENS if gpu else 16, config["text_dim"], generator=g)
        inputs = [(x.to(device, dtype), torch.tensor([500], device=device), text.to(device, dtype))]
        reps = (3 if case["latent_frames"] > 3 else 10) if gpu else 3

        def forward(hidden, timestep, encoder):
            with torch.inference_mode():
                return model(hidden, timestep, encoder, return_dict=False)[0]

        base = time_ms(forward, inputs, device, warmup=2, reps=reps)
        expected = forward(*inputs[0]).double()
        tokens = case["latent_frames"] * case["latent_hw"][0] * case["latent_hw"][1] // 4
        row = dict(case, tokens=tokens, diffusers_default=base, xjfast={})
        out["rows"].append(row)
        for precision in precisions:
            replaced = xjd.enable(model, precision=precision, backend=backend)
            reset_fallback_counts()
            try:
                timing = time_ms(forward, inputs, device, warmup=2, reps=reps)
                got = forward(*inputs[0])
                row["xjfast"][precision] = dict(timing, speedup=base["median_ms"] / timing["median_ms"],
                                                fallbacks=fallback_counts(), **accuracy(got, expected))
            except Exception as exc:  # recorded; the default's figures stand
                row["xjfast"][precision] = {"error": error_text(exc)}
                fail_if_context_lost(device, f"diffusers Wan {case['latent_frames']} latent frames, xjfast {precision}")
            finally:
                xjd.disable(model, replaced)
            fig = row["xjfast"][precision]
            if "speedup" in fig:
                log(f"  diffusers Wan {case['latent_frames']} latent frame(s): default {base['median_ms']:.1f} ms, "
                    f"xjfast {precision} {fig['median_ms']:.1f} ms ({fig['speedup']:.2f}x, rel_l2 {fig['rel_l2']:.2e})")
        last = (time.perf_counter() - started, case["latent_frames"])
    return out
