"""CausalDiT.from_pretrained: diffusers' WanTransformer3DModel layout and the original Wan2.1 layout."""
import json

import pytest
import torch
from safetensors.torch import save_file

from xjfast.models import CausalDiT, build
from xjfast.ops.denoise_step import unpatchify

from wan_diffusers import tiny_wan_transformer


@torch.no_grad()
def test_diffusers_weights_reproduce_diffusers_forward():
    reference = tiny_wan_transformer(perturb=True)
    x, t, context = torch.randn(1, 4, 3, 8, 8), torch.tensor([500.0]), torch.randn(1, 7, 32)
    expected = reference(x, t, context).sample
    model = CausalDiT.from_pretrained(reference.state_dict(), heads=2)
    # full (non-causal) attention: the 3 frames as one block
    tokens = model(x, t[:, None], model.prompt_kv(context), block_frames=3, precision="bf16", backend="reference")
    assert (unpatchify(tokens, x.shape, (1, 2, 2)) - expected).abs().max() < 1e-4


def test_wan_layout_round_trips_through_sharded_safetensors(tmp_path):
    model, *_ = build("tiny", seed=5)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    keys = sorted(state)
    save_file({k: state[k] for k in keys[: len(keys) // 2]}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({k: state[k] for k in keys[len(keys) // 2:]}, tmp_path / "model-00002-of-00002.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"num_heads": 2}))
    loaded = CausalDiT.from_pretrained(tmp_path)
    assert loaded.cfg == model.cfg
    assert all(torch.equal(loaded.state_dict()[k], state[k]) for k in keys)
    single = tmp_path / "single.safetensors"
    save_file(state, single)
    assert CausalDiT.from_pretrained(single, heads=2).cfg == model.cfg


def test_mismatched_checkpoint_lists_missing_and_unexpected_keys():
    model, *_ = build("tiny")
    state = dict(model.state_dict())
    state.pop("blocks.1.ffn.2.bias")
    state["blocks.1.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys \['blocks.1.ffn.2.bias'\], unexpected keys "
                                         r"\['blocks.1.extra.weight'\]"):
        CausalDiT.from_pretrained(state, heads=2)
    with pytest.raises(ValueError, match="not a Wan2.1 or diffusers"):
        CausalDiT.from_pretrained({"foo": torch.zeros(1)})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CausalDiT.from_pretrained("/nonexistent/weights.safetensors")


@pytest.mark.parametrize("name, content", [("model.safetensors", b"not a checkpoint"), ("model.pt", b"\x00garbage")])
def test_unreadable_checkpoint_file_is_named(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=f"path_or_state_dict: .*{name} is not a readable checkpoint"):
        CausalDiT.from_pretrained(tmp_path / name)


def test_what_is_neither_path_nor_state_dict_is_named():
    with pytest.raises(TypeError, match="path_or_state_dict: expected a path or a state dict, got int"):
        CausalDiT.from_pretrained(5)


@pytest.mark.gpu
@torch.no_grad()
def test_diffusers_weights_reproduce_diffusers_forward_on_the_gpu_in_fp8():
    reference = tiny_wan_transformer(perturb=True).cuda().to(torch.bfloat16)
    x = torch.randn(1, 4, 3, 16, 16, device="cuda", dtype=torch.bfloat16)
    t, context = torch.tensor([500.0], device="cuda"), torch.randn(1, 7, 32, device="cuda", dtype=torch.bfloat16)
    expected = reference(x, t, context).sample.float()
    model = CausalDiT.from_pretrained(reference.state_dict(), heads=2).cuda().to(torch.bfloat16)
    tokens = model(x, t[:, None], model.prompt_kv(context), block_frames=3, precision="fp8")  # auto: a GPU kernel
    out = unpatchify(tokens, x.shape, (1, 2, 2)).float()
    assert (out - expected).norm() <= 5e-2 * expected.norm()
