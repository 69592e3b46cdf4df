"""Drop-in use: xjfast.sdpa, patch()/unpatch(), and diffusers' WanTransformer3DModel."""
import copy
import inspect
import pickle
import re
import threading
import warnings

import pytest
import torch

import xjfast
from xjfast.errors import BackendUnavailable
from xjfast.integrations import sdpa as sdpa_module
from xjfast.integrations.sdpa import (accelerated_counts, fallback_counts, is_patched, patch, reset_fallback_counts,
                                      sdpa, unpatch)

from attention_oracle import cosine, exact_attention, rel_l2
from wan_diffusers import tiny_wan_transformer


def bhld(B=1, H=2, L=96, D=64, dtype=torch.float32):
    return [torch.randn(B, H, L, D, dtype=dtype) for _ in range(3)]


F = torch.nn.functional
CROSS = "query/key/value shapes differ (e.g. cross-attention)"


@pytest.fixture(autouse=True)
def clean_state():
    reset_fallback_counts()
    yield
    unpatch()
    assert F.scaled_dot_product_attention is sdpa_module.TORCH_SDPA, "every routing ended, torch's SDPA is back"


def test_sdpa_matches_torch_in_bf16_precision():
    q, k, v = bhld()
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.1)
    out = sdpa(q, k, v, scale=0.1, precision="bf16", backend="reference")
    assert out.shape == ref.shape and (out - ref).abs().max() < 1e-5
    assert fallback_counts() == {} and accelerated_counts() == {"reference": 1}
    assert out.transpose(1, 2).is_contiguous()  # the kernels' [B, L, H, D], seen as [B, H, L, D]


def test_sdpa_fp8_within_design_bounds():
    q, k, v = bhld(L=256)
    k = k + 2 * torch.randn(1, 2, 1, 64)
    out = sdpa(q, k, v, backend="reference")
    ref, _ = exact_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    ref = ref.transpose(1, 2)
    assert rel_l2(out, ref) <= 7e-2 and cosine(out, ref) >= 0.997


@pytest.mark.parametrize("kwargs, reason", [
    (dict(attn_mask=torch.ones(96, 96, dtype=torch.bool)), "an attn_mask other than a bool key-padding mask"),
    (dict(attn_mask=torch.zeros(1, 1, 1, 96)), "an attn_mask other than a bool key-padding mask"),
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


def key_padding(kept, L=96):
    return torch.arange(L)[None, :] < torch.tensor(kept)[:, None]


@pytest.mark.parametrize("kept, mask_shape", [
    ([96], (1, 1, 1, 96)),            # keeps every key
    ([40], (1, 1, 1, 96)),            # one row for the whole batch
    ([40], (1, 96)),                  # fewer dims, broadcast as torch does (not 1-D: torch refuses it)
    ([40, 40, 7], (3, 1, 1, 96)),     # a run of equal rows, then another
    ([7, 96, 40], (3, 1, 1, 96)),
])
def test_key_padding_masks_are_accelerated_exactly(kept, mask_shape):
    q, k, v = bhld(B=3)
    mask = key_padding(kept).reshape(mask_shape)
    out = sdpa(q, k, v, attn_mask=mask, scale=0.1, precision="bf16", backend="reference")
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.1)
    assert out.shape == ref.shape and (out - ref).abs().max() < 1e-5
    assert fallback_counts() == {} and accelerated_counts() == {"reference": 1}


@pytest.mark.parametrize("mask, reason", [
    (torch.tensor([[True] * 40 + [False, True] + [False] * 54]), "keeps other keys than a prefix"),
    (torch.zeros(1, 1, 96, dtype=torch.bool), "keeps no key of a row"),
    (key_padding([40, 0]).reshape(2, 1, 1, 96), "keeps no key of a row"),
])
def test_key_padding_masks_that_are_not_prefixes_go_to_torch(mask, reason):
    q, k, v = bhld(B=2)
    with pytest.warns(UserWarning, match=reason):
        out = sdpa(q, k, v, attn_mask=mask, backend="reference")
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), equal_nan=True)
    assert list(fallback_counts()) == [f"a key-padding mask that {reason} of the row" if "prefix" in reason
                                       else f"a key-padding mask that {reason}"]
    assert accelerated_counts() == {}


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
    assert set(fallback_counts()) == {CROSS, "head_dim 32 (xjfast has (64, 128))"}


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
    assert accelerated_counts() == {"reference": 1} and fallback_counts() == {}  # the call ran on xjfast
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


@pytest.mark.parametrize("kwargs", [dict(is_causal=0), dict(is_causal=None), dict(enable_gqa=""), dict(dropout_p=None),
                                    dict(dropout_p=0j), dict(scale=torch.tensor([0.125]))])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_what_torch_rejects_is_rejected_the_same_way(kwargs, backend):
    """Arguments of a type torch's SDPA refuses (a falsy int or None for a bool, None for dropout_p,
    a 1-d tensor scale) raise torch's own TypeError, rather than being read as False, 0 or a float."""
    q, k, v = bhld(dtype=torch.float16)
    with pytest.raises(TypeError) as expected:
        F.scaled_dot_product_attention(q, k, v, **kwargs)
    with pytest.raises(TypeError, match=re.escape(str(expected.value))):
        sdpa(q, k, v, backend=backend, **kwargs)
    assert fallback_counts() == {} and accelerated_counts() == {}  # nothing ran


def test_public_name():
    assert xjfast.sdpa is sdpa


def test_inputs_that_require_grad_go_to_torch_and_backpropagate():
    q, k, v = (t.requires_grad_() for t in bhld())
    with pytest.warns(UserWarning, match="require grad"):
        out = sdpa(q, k, v, backend="reference")
    out.sum().backward()
    grads = [t.grad for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    F.scaled_dot_product_attention(q, k, v).sum().backward()
    assert all(torch.equal(g, t.grad) for g, t in zip(grads, (q, k, v)))
    assert fallback_counts() == {"inputs that require grad (xjfast has no backward)": 1}
    with torch.no_grad():  # no graph to build: accelerated
        sdpa(q, k, v, backend="reference")
    assert accelerated_counts() == {"reference": 1}


@pytest.mark.parametrize("make, kwargs, reason", [
    (lambda q: q.transpose(-1, -2).contiguous().transpose(-1, -2), {}, "a last dimension with stride != 1"),
    (lambda q: q, dict(scale=0.0), "scale <= 0 or not finite"),
    (lambda q: q, dict(scale=-0.125), "scale <= 0 or not finite"),
    (lambda q: q, dict(scale=float("inf")), "scale <= 0 or not finite"),
    (lambda q: q[..., :48, :], dict(enable_gqa=True), CROSS),
    (lambda q: q[0], {}, "inputs that are not 4-D [B, H, L, D]"),
])
def test_valid_torch_inputs_go_to_torch_with_their_reason(make, kwargs, reason):
    q, k, v = bhld()
    q = make(q)
    k, v = (make(t) if q.dim() == 3 else t for t in (k, v))
    with pytest.warns(UserWarning, match="hands this call to torch"):
        out = sdpa(q, k, v, backend="reference", **kwargs)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, **kwargs), rtol=0, atol=0, equal_nan=True)
    assert fallback_counts() == {reason: 1}


def test_grouped_query_attention_has_its_reason_and_equal_heads_ignore_enable_gqa():
    q, kv = torch.randn(1, 4, 96, 64), torch.randn(1, 2, 96, 64)
    with pytest.warns(UserWarning, match="grouped-query"):
        out = sdpa(q, kv, kv, enable_gqa=True, backend="reference")
    assert torch.equal(out, F.scaled_dot_product_attention(q, kv, kv, enable_gqa=True))
    q, k, v = bhld()
    out = sdpa(q, k, v, enable_gqa=True, precision="bf16", backend="reference")  # torch ignores it too
    assert (out - F.scaled_dot_product_attention(q, k, v)).abs().max() < 1e-5
    assert fallback_counts() == {"grouped-query attention (enable_gqa with fewer key/value heads)": 1}
    assert accelerated_counts() == {"reference": 1}


def test_mixed_dtypes_get_torchs_own_error():
    q, k, v = bhld()
    with pytest.raises(RuntimeError, match="same dtype"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sdpa(q.bfloat16(), k, v, backend="reference")
    assert fallback_counts() == {"query/key/value of different dtypes or devices": 1}


def test_explicit_gpu_backends_that_cannot_run_raise(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # conftest runs Triton in its interpreter
    q, k, v = bhld(dtype=torch.bfloat16)
    for backend in ("triton", "cuda"):
        with pytest.raises(BackendUnavailable, match=f"backend '{backend}' is unavailable"):
            sdpa(q, k, v, backend=backend)
    assert fallback_counts() == {} and accelerated_counts() == {}


def test_triton_kernel_through_sdpa():
    """On the GPU, or in Triton's interpreter on the CPU (conftest)."""
    from xjfast.backends import unusable_reason
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reason = unusable_reason("temporal_attention", "triton", device)
    if reason is not None:
        pytest.skip(reason)
    # diffusers' layout: [B, L, H, D] tensors permuted to [B, H, L, D]
    q, k, v = (torch.randn(1, 64, 2, 64, dtype=torch.bfloat16, device=device).transpose(1, 2) for _ in range(3))
    out = sdpa(q, k, v, backend="triton")
    ref = sdpa(q, k, v, backend="reference")
    assert accelerated_counts() == {"triton": 1, "reference": 1}
    assert out.stride() == ref.stride() and (out.float() - ref.float()).abs().max() < 2e-2


@pytest.fixture
def fake_gpu(monkeypatch):
    """What the runtime decision reads of a GPU, faked: its capability, and which backends exist."""
    import xjfast.backends as backends
    available = {"reference": None, "triton": None, "cuda": "xjfast._C is not built"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(backends, "backend_unavailable_reason", lambda backend, device=None: available[backend])
    monkeypatch.delenv("XJFAST_DISABLE", raising=False)

    def choose(capability, precision="fp8", **env):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        q, k, v = (torch.randn(1, 128, 2, 64, dtype=torch.bfloat16) for _ in range(3))
        plan = sdpa_module.AttentionPlan(128, (False,), False, 0.125, None, precision)
        impl, reason = sdpa_module.runtime_choice(torch.device("cuda", 0), (q, k, v, plan, None), "auto")
        return (impl.backend if impl else None), reason
    return available, choose


def test_auto_on_a_gpu_the_kernels_cannot_serve_hands_to_torch_not_the_reference(fake_gpu):
    """Decided by the resolver on the call's arguments (never the O(L^2) Python reference on a GPU)."""
    available, choose = fake_gpu
    assert choose((9, 0)) == ("triton", None)
    backend, reason = choose((8, 0))  # A100: below the Triton kernel's 8.9
    assert backend is None and "needs compute capability >= 8.9" in reason and "xjfast._C is not built" in reason
    backend, reason = choose((9, 0), XJFAST_DISABLE="temporal_attention:triton")
    assert backend is None and "disabled by XJFAST_DISABLE" in reason
    available.update(triton="Triton is not installed", cuda=None)
    assert choose((9, 0)) == ("cuda", None)
    backend, reason = choose((9, 0), precision="bf16")  # the CUDA kernel is FP8 only
    assert backend is None and "implements precision='fp8'" in reason


def fallback_warnings(caught) -> list:
    return [(w.filename, w.lineno) for w in caught if issubclass(w.category, sdpa_module.XjfastFallbackWarning)]


def test_warnings_point_at_the_callers_line():
    q, k, v = bhld()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = inspect.currentframe().f_lineno + 1
        sdpa(q, k, v, dropout_p=0.1, backend="reference")
        with patch(backend="reference"):
            F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert fallback_warnings(caught) == [(__file__, line), (__file__, line + 2)]


def test_a_fallback_warns_from_the_interactive_interpreter_and_python_c():
    """The REPL's and `python -c`'s __main__ has a loader without source (BuiltinImporter): its
    get_source raised ImportError through warn_explicit(module_globals=...), so a fallback crashed."""
    import subprocess
    import sys
    code = ("import torch, warnings, xjfast\nwarnings.simplefilter('always')\n"
            "q = torch.randn(1, 2, 64, 64, dtype=torch.bfloat16)\nprint(tuple(xjfast.sdpa(q, q, q).shape))\n")
    for argv, stdin in (([sys.executable, "-c", code], None), ([sys.executable, "-i", "-q"], code)):
        run = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=120)
        assert "(1, 2, 64, 64)" in run.stdout and "Traceback" not in run.stderr, (argv, run.stdout, run.stderr)
        assert "XjfastFallbackWarning" in run.stderr and "tensors on the CPU" in run.stderr, run.stderr


def test_a_reason_warns_again_after_a_reset():
    q, k, v = bhld()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # Python's own: once per location
        for _ in range(2):
            sdpa(q, k, v, dropout_p=0.1, backend="reference")  # the same line each time
            reset_fallback_counts()
    assert len(fallback_warnings(caught)) == 2


def test_patches_end_in_any_order():
    q, k, v = bhld()
    first, second = patch(precision="bf16", backend="reference"), patch(precision="fp8", backend="reference")
    first.__exit__(None, None, None)
    assert is_patched()
    fp8 = F.scaled_dot_product_attention(q, k, v)  # the newest patch's settings
    assert torch.equal(fp8, sdpa(q, k, v, backend="reference"))
    second.__exit__(None, None, None)
    second.__exit__(None, None, None)  # twice: harmless
    assert not is_patched() and F.scaled_dot_product_attention is sdpa_module.TORCH_SDPA
    with patch(backend="reference"):
        patch(backend="reference")
        unpatch()  # ends every patch, the context manager's too
        assert not is_patched()
    assert F.scaled_dot_product_attention is sdpa_module.TORCH_SDPA


def test_processor_routing_is_per_thread_and_ends_in_any_order():
    """Thread A's processor routes only A's calls; B's processor, entered after A's and left after
    it, does not leave torch's SDPA routed (the reviewer's interleaving)."""
    from xjfast.integrations.diffusers import XjfastAttnProcessor
    q, k, v = bhld()
    b_entered, a_exited, results = threading.Event(), threading.Event(), {}

    class ProcA:
        def __call__(self, attn, hidden_states):
            b_entered.wait(10)
            results["a"] = F.scaled_dot_product_attention(q, k, v)
            return hidden_states

    class ProcB:
        def __call__(self, attn, hidden_states):
            b_entered.set()
            a_exited.wait(10)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    a = threading.Thread(target=XjfastAttnProcessor(ProcA(), "bf16", "reference"), args=(None, q))
    b = threading.Thread(target=XjfastAttnProcessor(ProcB(), "bf16", "reference"), args=(None, q))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a.start()
        b.start()
        a.join()
        # B is still inside its processor: this thread's call is torch's, not counted
        assert not is_patched()
        assert torch.equal(F.scaled_dot_product_attention(q, k, v), sdpa_module.TORCH_SDPA(q, k, v))
        a_exited.set()
        b.join()
    assert F.scaled_dot_product_attention is sdpa_module.TORCH_SDPA
    assert accelerated_counts() == {"reference": 1}  # A's call
    assert fallback_counts() == {"is_causal (token-causal; xjfast masks by blocks of frames)": 1}  # B's
    assert (results["a"] - sdpa_module.TORCH_SDPA(q, k, v)).abs().max() < 1e-5


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
    assert fallback_counts() == {CROSS: 2} and accelerated_counts() == {"reference": 2}
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


def test_diffusers_disable_checks_what_it_restores(wan):
    """A `replaced` that is not enable()'s dict of processors is named, before the model is touched."""
    from xjfast.integrations.diffusers import XjfastAttnProcessor, disable, enable
    model = wan[0]
    replaced = enable(model, backend="reference")
    with pytest.raises(TypeError, match="replaced: expected the dict of processors enable[(][)] returned, got list"):
        disable(model, list(replaced.values()))
    name = next(iter(replaced))
    with pytest.raises(TypeError, match=f"replaced\\[{name!r}\\]: expected an attention processor .*got int"):
        disable(model, dict(replaced, **{name: 3}))
    assert all(isinstance(p, XjfastAttnProcessor) for p in model.attn_processors.values())
    disable(model, replaced)


@torch.no_grad()
def test_diffusers_fallback_warning_points_at_the_models_caller(wan):
    from xjfast.integrations.diffusers import disable, enable
    model, inputs, _ = wan
    enable(model, backend="reference")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = inspect.currentframe().f_lineno + 1
        model(*inputs)  # the text cross-attention falls back
    disable(model)
    assert fallback_warnings(caught) == [(__file__, line)]


@pytest.fixture
def diffusers_backend():
    """set_attention_backend also sets diffusers' process-wide active backend: put it back after."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry
    active = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry._active_backend = active


def backend_names(model) -> set:
    return {str(getattr(p._attention_backend, "value", None)) for p in model.attn_processors.values()}


@torch.no_grad()
def test_diffusers_processors_survive_deepcopy_and_pickle_and_keep_what_diffusers_sets(wan, diffusers_backend):
    from xjfast.integrations.diffusers import XjfastAttnProcessor, disable, enable
    model, inputs, reference = wan
    replaced = enable(model, precision="bf16", backend="reference")
    name = "blocks.0.attn1.processor"
    running = model.attn_processors[name]
    # diffusers filters the kwargs it passes by this signature: the original's
    assert inspect.signature(running.__call__) == inspect.signature(replaced[name].__call__)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert all(isinstance(p, XjfastAttnProcessor) for p in clone.attn_processors.values())
        reset_fallback_counts()
        assert (clone(*inputs).sample - reference).abs().max() < 1e-4 and accelerated_counts() == {"reference": 2}
    model.set_attention_backend("_native_math")  # lands on the processors that run, which still route
    assert running._attention_backend.value == "_native_math" and replaced[name]._attention_backend is None
    reset_fallback_counts()
    assert (model(*inputs).sample - reference).abs().max() < 1e-4 and accelerated_counts() == {"reference": 2}
    disable(model, replaced)  # the processors enable() replaced, with what diffusers set meanwhile
    assert model.attn_processors[name] is replaced[name] and backend_names(model) == {"_native_math"}
    enable(model, backend="reference")
    model.set_attention_backend("native")
    disable(model)  # without `replaced`: unwrapped, keeping it too
    assert not any(isinstance(p, XjfastAttnProcessor) for p in model.attn_processors.values())
    assert backend_names(model) == {"native"}


@torch.no_grad()
def test_diffusers_backends_that_bypass_torch_sdpa_are_refused_or_counted(wan, diffusers_backend):
    from xjfast.integrations.diffusers import XjfastAttnProcessor, disable, enable
    model, inputs, _ = wan
    model.set_attention_backend("flex")
    with pytest.raises(ValueError, match="attention backend is 'flex'.*set_attention_backend\\('native'\\)"):
        enable(model)
    assert not any(isinstance(p, XjfastAttnProcessor) for p in model.attn_processors.values())
    model.set_attention_backend("native")
    replaced = enable(model, backend="reference")
    model.set_attention_backend("flex")  # after enable(): every processor call counted, warned once
    with pytest.warns(UserWarning, match="accelerated nothing.*'flex'"):
        model(*inputs)
    assert fallback_counts() == {"diffusers attention backend 'flex', which does not call torch's "
                                 "scaled_dot_product_attention": 4} and accelerated_counts() == {}
    disable(model, replaced)


def tiny_hunyuan_video():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=64, num_layers=1, num_single_layers=1,
        num_refiner_layers=1, text_embed_dim=32, pooled_projection_dim=16, rope_axes_dim=(16, 24, 24),
        guidance_embeds=False).eval()


def hunyuan_inputs(device="cpu", dtype=torch.float32):
    """Latents of 2x8x8 (32 tokens), 7 text tokens of which the last 3 are padding."""
    g = torch.Generator().manual_seed(1)
    text_mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0]])
    return [t.to(device) for t in (torch.randn(1, 4, 2, 8, 8, generator=g).to(dtype), torch.tensor([500]),
                                   torch.randn(1, 7, 32, generator=g).to(dtype), text_mask,
                                   torch.randn(1, 16, generator=g).to(dtype))]


@torch.no_grad()
def test_hunyuan_video_text_padding_mask_is_accelerated_and_matches_diffusers():
    from xjfast.integrations.diffusers import disable, enable
    model = tiny_hunyuan_video()
    inputs = hunyuan_inputs()
    reference = model(*inputs).sample
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning at enable(): the model is supported
        replaced = enable(model, precision="bf16", backend="reference")
    with pytest.warns(UserWarning, match="other than a bool key-padding mask"):
        out = model(*inputs).sample
    disable(model, replaced)
    # the dual- and single-stream blocks' joint attention (padding mask) ran on xjfast; the token
    # refiner's square text mask went to torch
    assert accelerated_counts() == {"reference": 2}
    assert fallback_counts() == {sdpa_module.MASK_REASON: 1}
    assert (out - reference).abs().max() <= 1e-5 * reference.abs().max()
    assert torch.equal(model(*inputs).sample, reference)


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
    assert fallback_counts() == {} and accelerated_counts() and set(accelerated_counts()) <= {"triton", "cuda"}, \
        "accelerated, not handed to torch"
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
    assert set(fallback_counts()) == {CROSS} and accelerated_counts() and set(accelerated_counts()) <= {"triton", "cuda"}
    assert 1e-4 < rel_l2(out.cpu(), reference.cpu().double()) < 5e-2
    assert torch.equal(model(*inputs).sample.float(), reference)  # disable restored diffusers' attention


@pytest.mark.gpu
@torch.no_grad()
def test_sdpa_key_padding_on_the_gpu_runs_fp8_within_design_bounds():
    q, k, v = gpu_bhld(L=1024)
    q, k, v = (t.expand(2, -1, -1, -1).clone() for t in (q, k, v))
    kept = torch.tensor([1000, 777], device="cuda")
    mask = (torch.arange(1024, device="cuda")[None, :] < kept[:, None]).reshape(2, 1, 1, 1024)
    out = sdpa(q, k, v, attn_mask=mask)
    assert fallback_counts() == {} and accelerated_counts() and set(accelerated_counts()) <= {"triton", "cuda"}, \
        "accelerated, not handed to torch"
    for b, n in enumerate(kept.tolist()):  # every query (padded ones too) sees the first n keys
        qb, kb, vb = q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n]
        scores = (qb.double() @ kb.double().transpose(-1, -2)) * 128 ** -0.5
        ref = (scores.softmax(-1) @ vb.double()).cpu()
        assert rel_l2(out[b:b + 1].cpu(), ref) <= 7e-2 and cosine(out[b:b + 1].cpu(), ref) >= 0.997


@pytest.mark.gpu
@torch.no_grad()
def test_sdpa_key_padding_while_a_cuda_graph_is_captured_goes_to_torch():
    q, k, v = gpu_bhld(L=256)
    mask = (torch.arange(256, device="cuda") < 200).reshape(1, 1, 1, 256)
    sdpa(q, k, v, attn_mask=mask)  # warm-up outside the capture: xjfast's kernel, and torch's masked SDPA
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    reset_fallback_counts()
    graph = torch.cuda.CUDAGraph()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.cuda.graph(graph):
            out = sdpa(q, k, v, attn_mask=mask)
    graph.replay()
    torch.cuda.synchronize()
    assert list(fallback_counts()) == ["a key-padding mask while a CUDA graph is being captured (reading it needs "
                                       "the host)"]
    torch.testing.assert_close(out, reference, atol=2e-2, rtol=0)


@pytest.mark.gpu
@torch.no_grad()
def test_diffusers_hunyuan_video_on_the_gpu_fp8_stays_close():
    from xjfast.integrations.diffusers import disable, enable
    model = tiny_hunyuan_video().cuda().to(torch.bfloat16)
    inputs = hunyuan_inputs("cuda", torch.bfloat16)
    reference = model(*inputs).sample.float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the token refiner's square mask goes to torch
        enable(model)
        out = model(*inputs).sample.float()
    disable(model)
    assert set(accelerated_counts()) <= {"triton", "cuda"} and sum(accelerated_counts().values()) == 2
    assert fallback_counts() == {sdpa_module.MASK_REASON: 1}
    assert 1e-4 < rel_l2(out.cpu(), reference.cpu().double()) < 5e-2
