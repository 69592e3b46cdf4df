"""The ops are torch.library custom ops with fake implementations: torch.compile sees one node each."""
import pytest
import torch

from xjfast.models import build
from xjfast.ops.denoise_step import _coefficients  # noqa: F401  (registers xjfast::denoise_step)
from xjfast.ops.temporal_attention import AttentionPlan  # noqa: F401  (registers xjfast::temporal_attention)


def test_custom_ops_pass_opcheck():
    q, k, v = (torch.randn(1, 128, 2, 64) for _ in range(3))
    torch.library.opcheck(torch.ops.xjfast.temporal_attention.default,
                          (q, k, v, 64, [False, True], True, 0.125, "bf16", "reference"))
    x_t, model_out = torch.randn(1, 4, 1, 8, 8), torch.randn(1, 16, 16)
    coef = torch.tensor([[1.0, -0.5, 0.8, 0.2]])
    torch.library.opcheck(torch.ops.xjfast.denoise_step.default,
                          (x_t, model_out, coef, 5, 0, 3, [1, 2, 2], "reference", torch.empty_like(x_t),
                           torch.empty_like(x_t)))


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

    eager = forward(x, t).float()
    compiled = torch.compile(forward, fullgraph=True)(x, t).float()
    assert (compiled - eager).norm() <= 1e-2 * eager.norm()
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
