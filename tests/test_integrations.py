"""Drop-in use: xjfast.sdpa, patch()/unpatch(), and diffusers' WanTransformer3DModel."""
import pytest
import torch

import xjfast
from xjfast.integrations import sdpa as sdpa_module
from xjfast.integrations.sdpa import fallback_counts, is_patched, patch, reset_fallback_counts, sdpa, unpatch

from attention_oracle import cosine, exact_attention, rel_l2
from wan_diffusers import tiny_wan_transformer


def bhld(B=1, H=2, L=96, D=64, dtype=torch.float32):
    return [torch.randn(B, H, L, D, dtype=dtype) for _ in range(3)]


@pytest.fixture(autouse=True)
def clean_state():
    reset_fallback_counts()
    yield
    unpatch()


def test_sdpa_matches_torch_in_bf16_precision():
    q, k, v = bhld()
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.1)
    out = sdpa(q, k, v, scale=0.1, precision="bf16", backend="reference")
    assert out.shape == ref.shape and (out - ref).abs().max() < 1e-5
    assert fallback_counts() == {}


def test_sdpa_fp8_within_design_bounds():
    q, k, v = bhld(L=256)
    k = k + 2 * torch.randn(1, 2, 1, 64)
    out = sdpa(q, k, v, backend="reference")
    ref, _ = exact_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    ref = ref.transpose(1, 2)
    assert rel_l2(out, ref) <= 7e-2 and cosine(out, ref) >= 0.997


@pytest.mark.parametrize("kwargs, reason", [
    (dict(attn_mask=torch.ones(96, 96, dtype=torch.bool)), "an explicit attn_mask"),
    (dict(dropout_p=0.1), "dropout_p > 0"),
    (dict(is_causal=True), "is_causal"),
])
def test_what_is_not_accelerated_goes_to_torch_counted_and_warned_once(kwargs, reason):
    q, k, v = bhld()
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="xjfast.sdpa"):
        out = sdpa(q, k, v, backend="reference", **kwargs)
    torch.manual_seed(0)
    assert torch.equal(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, **kwargs))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second time: counted, not warned
        sdpa(q, k, v, backend="reference", **kwargs)
    assert list(fallback_counts().values()) == [2] and next(iter(fallback_counts())).startswith(reason)


def test_empty_tensors_fall_back():
    q = torch.randn(1, 2, 0, 64)
    with pytest.warns(UserWarning, match="empty tensors"):
        out = sdpa(q, q, q, backend="reference")
    assert out.shape == q.shape and list(fallback_counts()) == ["empty tensors"]


def test_cross_attention_and_head_dims_fall_back():
    q = torch.randn(1, 2, 96, 64)
    kv = torch.randn(1, 2, 7, 64)
    with pytest.warns(UserWarning):
        sdpa(q, kv, kv, backend="reference")
        sdpa(*bhld(D=32), backend="reference")
    assert set(fallback_counts()) == {"query/key/value shapes differ (e.g. cross-attention) or are not [B, H, L, D]",
                                      "head_dim 32 (xjfast has (64, 128))"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_auto_on_cpu_hands_to_torch():
    with pytest.warns(UserWarning, match="tensors on the CPU"):
        sdpa(*bhld(dtype=torch.bfloat16))


def test_patch_as_context_manager_and_plain_call():
    original = torch.nn.functional.scaled_dot_product_attention
    q, k, v = bhld()
    with patch(precision="bf16", backend="reference"):
        assert is_patched()
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert torch.nn.functional.scaled_dot_product_attention is original and not is_patched()
    assert (out - original(q, k, v)).abs().max() < 1e-5
    patch()
    assert is_patched()
    unpatch()
    assert torch.nn.functional.scaled_dot_product_attention is sdpa_module.TORCH_SDPA


@pytest.mark.parametrize("call", [lambda **kw: sdpa(*bhld(), **kw), lambda **kw: patch(**kw)])
@pytest.mark.parametrize("kwargs, words", [(dict(precision="int8"), "precision: expected one of 'fp8', 'bf16'"),
                                           (dict(backend="gpu"), "backend: expected one of 'auto', 'reference'")])
def test_bad_settings_are_named_where_given(call, kwargs, words):
    """Also when the call would fall back to torch, and before a patch is installed."""
    with pytest.raises(ValueError, match=words):
        call(**kwargs)
    assert not is_patched()


def test_public_name():
    assert xjfast.sdpa is sdpa


@pytest.fixture(scope="module")
def wan():
    model = tiny_wan_transformer()
    inputs = (torch.randn(1, 4, 2, 8, 8), torch.tensor([500]), torch.randn(1, 7, 32))
    with torch.no_grad():
        reference = model(*inputs).sample
    return model, inputs, reference


@torch.no_grad()
def test_diffusers_wan_enable_bf16_matches_and_disable_restores(wan):
    from xjfast.integrations.diffusers import XjfastAttnProcessor, disable, enable
    model, inputs, reference = wan
    replaced = enable(model, precision="bf16", backend="reference")
    assert all(isinstance(p, XjfastAttnProcessor) for p in model.attn_processors.values())
    out = model(*inputs).sample
    assert (out - reference).abs().max() < 1e-4
    # self-attention ran on xjfast; the text cross-attention (7 keys) went to torch, counted
    assert fallback_counts() == {"query/key/value shapes differ (e.g. cross-attention) or are not [B, H, L, D]": 2}
    disable(model, replaced)
    assert not any(isinstance(p, XjfastAttnProcessor) for p in model.attn_processors.values())
    assert torch.equal(model(*inputs).sample, reference)


@torch.no_grad()
def test_diffusers_wan_fp8_stays_close(wan):
    from xjfast.integrations.diffusers import disable, enable
    model, inputs, reference = wan
    enable(model, precision="bf16", backend="reference")
    enable(model, precision="fp8", backend="reference")  # re-enabling replaces, never stacks
    out = model(*inputs).sample
    disable(model)
    err = rel_l2(out, reference.double())
    assert 1e-4 < err < 5e-2  # FP8 ran (not bf16) and stayed close


def test_diffusers_enable_rejects_other_models():
    pytest.importorskip("diffusers")
    from xjfast.integrations.diffusers import enable
    from xjfast.integrations.diffusers import disable
    with pytest.raises(TypeError, match="model: expected one of WanTransformer3DModel"):
        enable(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="model: expected one of WanTransformer3DModel"):
        disable(torch.nn.Linear(2, 2))


def test_diffusers_enable_checks_its_settings(wan):
    from xjfast.integrations.diffusers import enable
    with pytest.raises(ValueError, match="backend: expected one of"):
        enable(wan[0], backend="gpu")


# ---- on a GPU: the FP8 kernels behind the same one-liners -------------------------------------

def gpu_bhld(L=1024, D=128, H=4):
    q, k, v = (torch.randn(1, H, L, D, device="cuda") for _ in range(3))
    k = k + 2 * torch.randn(1, H, 1, D, device="cuda")  # per-channel bias, what K smoothing is for
    return q.bfloat16(), k.bfloat16(), v.bfloat16()


def exact_bhld(q, k, v):
    out, _ = exact_attention(*(t.transpose(1, 2).cpu() for t in (q, k, v)))
    return out.transpose(1, 2)


@pytest.mark.gpu
@torch.no_grad()
def test_sdpa_on_the_gpu_runs_fp8_within_design_bounds():
    q, k, v = gpu_bhld()
    out = sdpa(q, k, v)
    ref = exact_bhld(q, k, v)
    assert fallback_counts() == {}, "accelerated, not handed to torch"
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    assert rel_l2(out.cpu(), ref) <= 7e-2 and cosine(out.cpu(), ref) >= 0.997


@pytest.mark.gpu
@torch.no_grad()
def test_sdpa_bf16_on_the_gpu_holds_itself_as_flashattention_does():
    q, k, v = gpu_bhld(L=512)
    ref = exact_bhld(q, k, v)
    torch_bf16 = torch.nn.functional.scaled_dot_product_attention(q, k, v).cpu()
    out = sdpa(q, k, v, precision="bf16").cpu()
    assert (out.double() - ref).abs().max() <= 2 * (torch_bf16.double() - ref).abs().max() + 1e-5


@pytest.mark.gpu
@torch.no_grad()
def test_patch_routes_torch_sdpa_through_xjfast_on_the_gpu():
    q, k, v = gpu_bhld(L=256)
    direct = sdpa(q, k, v)
    with patch():
        routed = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert torch.equal(routed, direct) and fallback_counts() == {}


@pytest.mark.gpu
@torch.no_grad()
def test_diffusers_wan_on_the_gpu_fp8_stays_close():
    from xjfast.integrations.diffusers import disable, enable
    model = tiny_wan_transformer(perturb=True).cuda().to(torch.bfloat16)
    inputs = (torch.randn(1, 4, 3, 16, 16, device="cuda", dtype=torch.bfloat16), torch.tensor([500], device="cuda"),
              torch.randn(1, 7, 32, device="cuda", dtype=torch.bfloat16))
    reference = model(*inputs).sample.float()
    enable(model)
    out = model(*inputs).sample.float()
    disable(model)
    # self-attention ran on the FP8 kernels; only the text cross-attention went to torch
    assert set(fallback_counts()) == {"query/key/value shapes differ (e.g. cross-attention) or are not [B, H, L, D]"}
    assert 1e-4 < rel_l2(out.cpu(), reference.cpu().double()) < 5e-2
    assert torch.equal(model(*inputs).sample.float(), reference)  # disable restored diffusers' attention
