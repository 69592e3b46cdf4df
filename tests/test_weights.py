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
    (tmp_path / "config.json").write_text(json.dumps({"num_heads": 2, "dim": 128, "num_layers": 2}))
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


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(device="gpu"), ValueError, "device: expected a torch device, got 'gpu'"),
    pytest.param(dict(device="cuda"), ValueError, "device: expected a usable device, got cuda",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a CUDA GPU")),
    (dict(dtype="float16"), TypeError, "dtype: expected None or a floating-point torch.dtype, got 'float16'"),
    (dict(dtype=torch.int8), TypeError, "dtype: expected None or a floating-point torch.dtype, got torch.int8"),
])
def test_bad_device_or_dtype_is_named(kwargs, error, words):
    """Not torch's AssertionError ("Torch not compiled with CUDA enabled") or to()'s overload list."""
    _, state = tiny_state()
    with pytest.raises(error, match=words):
        CausalDiT.from_pretrained(state, **kwargs)


def test_a_state_dict_of_other_than_float_tensors_is_named():
    _, state = tiny_state()
    with pytest.raises(TypeError, match=r"path_or_state_dict: expected a state dict of tensors, got values of type "
                                        r"\['ndarray'\]"):
        CausalDiT.from_pretrained({k: v.numpy() for k, v in state.items()})
    with pytest.raises(ValueError, match=r"path_or_state_dict: expected floating-point weights, got tensors of dtype "
                                         r"\['torch.int32'\]"):
        CausalDiT.from_pretrained({k: v.to(torch.int32) for k, v in state.items()}, heads=2)


def test_bad_config_and_index_entries_are_named(tmp_path):
    _, state = tiny_state()
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"dim": 128, "num_layers": 4, "num_heads": 2, "eps": "1e-6"}))
    with pytest.raises(ValueError, match=r"eps \(config.json\): expected a positive finite number, got '1e-6'"):
        CausalDiT.from_pretrained(tmp_path)
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"patch_embedding.weight": 1}}))
    with pytest.raises(ValueError, match="path_or_state_dict: .* has no weight_map of key -> file name"):
        CausalDiT.from_pretrained(index)


def tiny_state():
    model, *_ = build("tiny", seed=5)
    return model, {k: v.contiguous() for k, v in model.state_dict().items()}


def test_an_index_json_names_exactly_the_shards_to_load(tmp_path):
    model, state = tiny_state()
    keys = sorted(state)
    halves = {"model-a.safetensors": keys[: len(keys) // 2], "model-b.safetensors": keys[len(keys) // 2:]}
    for name, part in halves.items():
        save_file({k: state[k] for k in part}, tmp_path / name)
    index = tmp_path / ("model" + ".safetensors.index.json")
    index.write_text(json.dumps({"weight_map": {k: name for name, part in halves.items() for k in part}}))
    save_file({k: torch.zeros_like(state[k]) for k in keys}, tmp_path / "old-model.safetensors")  # not in the index
    for path in (tmp_path, index):
        loaded = CausalDiT.from_pretrained(path, heads=2)
        assert all(torch.equal(loaded.state_dict()[k], state[k]) for k in keys)
    (tmp_path / "model-b.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"shards named in .* are missing: \[.*model-b.safetensors"):
        CausalDiT.from_pretrained(tmp_path, heads=2)


def test_a_folder_of_unrelated_safetensors_files_is_refused(tmp_path):
    _, state = tiny_state()
    save_file(state, tmp_path / "model.safetensors")
    save_file(state, tmp_path / "model-fp8.safetensors")
    with pytest.raises(ValueError, match="several .safetensors files that are not the shards of one checkpoint"):
        CausalDiT.from_pretrained(tmp_path, heads=2)


@pytest.mark.parametrize("change, error, message", [
    (lambda s: s.pop("blocks.0.ffn.0.weight"), ValueError, r"missing keys \['blocks.0.ffn.0.weight'\]"),
    (lambda s: [s.pop(k) for k in list(s) if k.startswith("blocks.")], ValueError, r"missing keys .*blocks"),
    (lambda s: s.update({"blocks.1.ffn.2.bias": torch.zeros(3)}), ValueError,
     r"shapes \(checkpoint, expected\) differ for \{'blocks.1.ffn.2.bias': \(\(3,\), \(128,\)\)"),
])
def test_a_checkpoint_of_another_structure_names_what_differs(change, error, message):
    _, state = tiny_state()
    change(state)
    with pytest.raises(error, match=message):
        CausalDiT.from_pretrained(state, heads=2)


@pytest.mark.parametrize("heads", [0, 3, 4, True])
def test_a_head_count_that_does_not_split_dim_is_named(heads):
    _, state = tiny_state()
    with pytest.raises(ValueError, match=f"heads: expected a head count that splits dim 128 .* got {heads}"):
        CausalDiT.from_pretrained(state, heads=heads)


def test_a_checkpoint_with_modules_kept_in_fp32_loads_in_one_dtype():
    """diffusers' bf16 pipelines keep some modules (time embedding, modulation) in fp32."""
    model, state = tiny_state()
    mixed = {k: v if k.startswith("time_embedding") or k.endswith("modulation") else v.bfloat16()
             for k, v in state.items()}
    loaded = CausalDiT.from_pretrained(mixed, heads=2)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    x, t = torch.randn(1, 4, 1, 16, 16, dtype=torch.bfloat16), torch.tensor([[500.0]])
    kv = loaded.prompt_kv(torch.randn(1, 7, loaded.cfg.text_dim, dtype=torch.bfloat16))
    assert loaded(x, t, kv, precision="bf16", backend="reference").isfinite().all()


@pytest.mark.parametrize("config", [{"num_heads": 64}, ["not", "a", "dict"], "{not json"])
def test_a_config_beside_the_weights_that_is_not_the_models_is_ignored_or_named(tmp_path, config):
    """Only a Wan transformer's config.json gives the head count; a folder may hold others' (T5's)."""
    model, state = tiny_state()
    save_file(state, tmp_path / "dit.safetensors")
    (tmp_path / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if isinstance(config, str):
        with pytest.raises(ValueError, match="config.json is not readable JSON"):
            CausalDiT.from_pretrained(tmp_path / "dit.safetensors", heads=2)
        return
    assert CausalDiT.from_pretrained(tmp_path / "dit.safetensors", heads=2).cfg == model.cfg
    assert CausalDiT.from_pretrained(tmp_path / "dit.safetensors").cfg.heads == 1  # dim // 128, not 64


def test_a_text_file_named_pt_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.pt").write_text("hello")
    with pytest.raises(ValueError, match="notes.pt is not a readable checkpoint"):
        CausalDiT.from_pretrained(tmp_path / "notes.pt")


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


def test_a_self_forcing_style_training_checkpoint_gives_its_ema_generator(tmp_path):
    """Self-Forcing, CausVid and LongLive save {"generator": ..., "generator_ema": ...}, the DiT under
    their wrapper's "model." beside the wrapper's own modules: from_pretrained takes the EMA weights
    (what they infer with) without the prefix, and leaves the wrapper's other modules out."""
    model, state = tiny_state()
    ema = {k: v + 1 for k, v in state.items()}
    checkpoint = {"generator": {f"model.{k}": v for k, v in state.items()},
                  "generator_ema": {**{f"model.{k}": v for k, v in ema.items()}, "_cls_pred_branch.0.weight": torch.ones(2)},
                  "critic": {"model.blocks.0.ffn.0.weight": torch.zeros(3)}, "step": 1000}
    torch.save(checkpoint, tmp_path / "self_forcing_dmd.pt")
    loaded = CausalDiT.from_pretrained(tmp_path / "self_forcing_dmd.pt", heads=2)
    assert loaded.cfg == model.cfg and all(torch.equal(loaded.state_dict()[k], ema[k]) for k in state)
    del checkpoint["generator_ema"]  # the generator's own weights, passed as a dict, under torch.compile's prefix
    checkpoint["generator"] = {f"_orig_mod.{k}": v for k, v in checkpoint["generator"].items()}
    loaded = CausalDiT.from_pretrained(checkpoint, heads=2)
    assert all(torch.equal(loaded.state_dict()[k], state[k]) for k in state)


def test_checkpoints_that_hold_no_single_dit_are_named(tmp_path):
    _, state = tiny_state()
    torch.save({"optimizer": {"lr": 0.1}, "step": 3}, tmp_path / "train.pt")
    with pytest.raises(ValueError, match=r"train.pt is not a readable checkpoint \(not a state dict of tensors, nor a "
                                         r"training checkpoint holding one under 'generator_ema', 'generator'.*"
                                         r"\(its keys: \['optimizer', 'step'\]\)"):
        CausalDiT.from_pretrained(tmp_path / "train.pt")
    two = {**{f"student.{k}": v for k, v in state.items()}, **{f"teacher.{k}": v for k, v in state.items()}}
    with pytest.raises(ValueError, match=r"holds several models, their weights under the prefixes \['student.', "
                                         r"'teacher.'\]: pass the state dict of one"):
        CausalDiT.from_pretrained(two, heads=2)
