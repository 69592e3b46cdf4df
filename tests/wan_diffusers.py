"""A small randomly initialised diffusers WanTransformer3DModel, shared by the tests that need one."""
import pytest
import torch


def tiny_wan_transformer(perturb: bool = False):
    """2 layers, 2 heads of 64, 4 latent channels, 32-dim text; skips the test without diffusers.

    perturb moves the weights away from diffusers' default init (zero biases, unit norms), so a
    wrong mapping of any parameter shows."""
    diffusers = pytest.importorskip("diffusers", reason="needs diffusers (pip install xjfast[diffusers])")
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=128, num_layers=2, rope_max_seq_len=64).eval()
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    return model
