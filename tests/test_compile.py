"""The ops are torch.library custom ops with fake implementations: torch.compile sees one node each."""
import warnings

import pytest
import torch

from xjfast.backends import resolve, unusable_reason
from xjfast.integrations import sdpa as sdpa_module
from xjfast.integrations.sdpa import accelerated_counts, fallback_counts, patch, reset_fallback_counts, sdpa, unpatch
from xjfast.models import build
from xjfast.ops.denoise_step import _coefficients  # noqa: F401  (registers xjfast::denoise_step)
from xjfast.ops.temporal_attention import AttentionPlan  # noqa: F401  (registers xjfast::temporal_attention)

from wan_diffusers import tiny_wan_transformer


def test_custom_ops_pass_opcheck():
    q, k, v = (torch.randn(1, 128, 2, 64) for _ in range(3))
    torch.library.opcheck(torch.ops.xjfast.temporal_attention.default,
                          (q, k, v, 64, [False, True], True, 0.125, "bf16", "reference"))
    x_t, model_out = torch.randn(1, 4, 1, 8, 8), torch.randn(1, 16, 16)
    coef = torch.tensor([[1.0, -0.5, 0.8, 0.2]])
    torch.library.opcheck(torch.ops.xjfast.denoise_step.default,
                          (x_t, model_out, coef, 5, 0, 3, [1, 2, 2], "reference", torch.empty_like(x_t),
                           torch.empty_like(x_t)))


def transposed(*shape, dtype=torch.float32):
    """[B, L, H, D] tensors seen as [B, H, L, D] (what diffusers hands torch's SDPA), and the reverse."""
    return [torch.randn(*shape, dtype=dtype).transpose(1, 2) for _ in range(3)]


def test_temporal_attention_out_is_contiguous_on_every_backend_as_its_fake_says():
    """xjfast.sdpa hands the op transposed views: the fake must give the real op's strides."""
    q, k, v = transposed(1, 2, 128, 64)  # [B, L, H, D] views of [B, H, L, D] tensors
    op = torch.ops.xjfast.temporal_attention.default
    torch.library.opcheck(op, (q, k, v, 64, [False, True], True, 0.125, "bf16", "reference"))
    torch.library.opcheck(op, (q, k, v, 128, [False], False, 0.125, "fp8", "reference"))
    try:
        import xjfast.kernels.temporal_attention  # noqa: F401  (the Triton kernel, in its interpreter here)
    except ImportError:
        return
    if torch.cuda.is_available() or unusable_reason("temporal_attention", "triton", "cpu") is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        out, _ = op(*(t.to(device, torch.bfloat16) for t in (q, k, v)), 128, [False], False, 0.125, "fp8", "triton")
        assert out.is_contiguous()


def test_sdpa_op_passes_opcheck():
    q, k, v = transposed(1, 128, 2, 64)  # [B, H, L, D] views of [B, L, H, D] tensors
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        padding = torch.arange(128)[None, :] < 100
        for mask, scale, precision, backend in ((None, None, "bf16", "reference"), (None, 0.1, "fp8", "reference"),
                                                (None, None, "fp8", "auto"), (padding, None, "bf16", "reference"),
                                                (padding, None, "fp8", "auto")):
            torch.library.opcheck(torch.ops.xjfast.sdpa.default, (q, k, v, mask, scale, precision, backend))


@torch.no_grad()
@pytest.mark.parametrize("layout, padded", [("transposed", False), ("contiguous", False), ("transposed", True)])
def test_sdpa_compiles_with_fullgraph(layout, padded):
    """A key-padding mask too: which keys it keeps is read inside the op, when the compiled code runs."""
    torch._dynamo.reset()
    q, k, v = transposed(1, 96, 2, 64) if layout == "transposed" else (torch.randn(1, 2, 96, 64) for _ in range(3))
    w = torch.randn(128, 128)
    mask = (torch.arange(96) < 70).reshape(1, 1, 1, 96) if padded else None

    def attend(q, k, v):
        out = sdpa(q, k, v, attn_mask=mask, precision="bf16", backend="reference")
        return out.transpose(1, 2).reshape(1, 96, 128) @ w + 1

    reset_fallback_counts()
    compiled = torch.compile(attend, fullgraph=True)(q, k, v)
    assert accelerated_counts() == {"reference": 1}  # counted by the op, when the compiled code runs
    assert torch.allclose(compiled, attend(q, k, v), atol=1e-4)


@torch.no_grad()
def test_patched_fallbacks_compile_with_fullgraph():
    """What torch's SDPA compiles, patched: the fallback bookkeeping is skipped while tracing."""
    torch._dynamo.reset()
    q, kv = torch.randn(1, 2, 96, 64), torch.randn(1, 2, 7, 64)
    mask = torch.ones(96, 96, dtype=torch.bool)

    def attend(q, kv):  # a text cross-attention, a masked self-attention and an accelerated one
        F = torch.nn.functional
        return F.scaled_dot_product_attention(q, kv, kv) + F.scaled_dot_product_attention(q, q, q, attn_mask=mask) \
            + F.scaled_dot_product_attention(q, q, q)

    try:
        with patch(precision="bf16", backend="reference"):
            reset_fallback_counts()
            compiled = torch.compile(attend, fullgraph=True)(q, kv)
            assert fallback_counts() == {} and accelerated_counts() == {"reference": 1}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                assert torch.allclose(compiled, attend(q, kv), atol=1e-4)
    finally:
        unpatch()


@torch.no_grad()
def test_diffusers_wan_enabled_compiles_with_fullgraph():
    from xjfast.integrations.diffusers import disable, enable
    torch._dynamo.reset()
    model = tiny_wan_transformer()
    inputs = (torch.randn(1, 4, 2, 8, 8), torch.tensor([500]), torch.randn(1, 7, 32))
    enable(model, precision="bf16", backend="reference")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            eager = model(*inputs).sample
        reset_fallback_counts()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(*inputs).sample  # inductor: above
        assert accelerated_counts() == {"reference": 2}  # self-attention on xjfast; cross-attention on torch
        assert torch.allclose(compiled, eager, atol=1e-5)
        assert torch.nn.functional.scaled_dot_product_attention is sdpa_module.TORCH_SDPA
    finally:
        disable(model)


@torch.no_grad()
@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_tiny_preset_compiles_with_fullgraph_on_the_cpu(precision):
    model, _, encoder, _ = build("tiny")
    kv = model.prompt_kv(encoder("a kite over the dunes"))
    x, t = torch.randn(1, 4, 2, 16, 16), torch.tensor([[0.0, 500.0]])

    def forward(x, t):
        return model(x, t, kv, block_frames=1, precision=precision, backend="reference")

    compiled, eager = torch.compile(forward, fullgraph=True)(x, t), forward(x, t)
    if precision == "bf16":  # no quantization: the same function to float32 rounding
        assert torch.allclose(compiled, eager, atol=1e-4)
    else:  # inductor's float32 reassociation may move a value across an e4m3 rounding boundary
        assert (compiled - eager).norm() <= 1e-2 * eager.norm()


@pytest.mark.gpu
@torch.no_grad()
def test_tiny_preset_compiles_and_captures_in_a_cuda_graph_on_the_gpu():
    """The fast ops as custom ops: fullgraph compile, and CUDA-graph capture of the eager forward."""
    model, _, encoder, _ = build("tiny")
    model = model.cuda().to(torch.bfloat16)
    kv = model.prompt_kv(encoder("a kite over the dunes").cuda().to(torch.bfloat16))
    x = torch.randn(1, 4, 2, 16, 16, device="cuda", dtype=torch.bfloat16)
    t = torch.tensor([[0.0, 500.0]], device="cuda")

    def forward(x, t):
        return model(x, t, kv, block_frames=1, precision="fp8")  # auto: the GPU kernels

    assert resolve("temporal_attention", "auto", x.device).backend in ("triton", "cuda")
    eager = forward(x, t).float()
    compiled = torch.compile(forward, fullgraph=True)(x, t).float()
    # the same FP8 kernels; inductor fuses the bf16 ops around them, skipping eager's per-op bf16
    # rounding (on the CPU the two differ by 8.0e-3 to 8.7e-3 over 6 seeds: 2e-2 leaves room for that)
    assert (compiled - eager).norm() <= 2e-2 * eager.norm()
    # capture (and its warm-up, so that libraries' workspaces exist before) on a side stream
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        forward(x, t)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        captured = forward(x, t)
    graph.replay()
    torch.cuda.synchronize()
    assert (captured.float() - eager).norm() <= 1e-3 * eager.norm()  # (library kernels may differ in capture)
