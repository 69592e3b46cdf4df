"""denoise_step against diffusers' schedulers, the token layout, noise keying, bad input, backends."""
import pytest
import torch

from xjfast import BackendUnavailable
from xjfast.ops.denoise_step import denoise_step
from xjfast.ops.philox import latent_noise

from backends import DEVICE, fast_backends, poisoned

SEED = 2 ** 35 + 11


def latents(B=2, C=16, F=2, H=8, W=12, dtype=torch.float32):
    return torch.randn(B, C, F, H, W).to(dtype)


def patchify(x, patch=(1, 2, 2)):
    """Wan2.1's patch order written independently: [B, C, F, H, W] -> [B, N, pt*ph*pw*C]."""
    B, C, F, H, W = x.shape
    pt, ph, pw = patch
    x = x.reshape(B, C, F // pt, pt, H // ph, ph, W // pw, pw)
    return x.permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(B, (F // pt) * (H // ph) * (W // pw), pt * ph * pw * C)


def unpatchify_wan(tokens, shape, patch):
    """Wan2.1's unpatchify, its einsum 'fhwpqrc->cfphqwr' per sample: [B, N, pt*ph*pw*C] -> latents."""
    B, C, F, H, W = shape
    pt, ph, pw = patch
    u = tokens.reshape(B, F // pt, H // ph, W // pw, pt, ph, pw, C)
    return torch.einsum("bfhwpqrc->bcfphqwr", u).reshape(B, C, F, H, W)


def injected_noise(monkeypatch, module, noise):
    """Make the scheduler's randn_tensor return `noise`; the returned list counts the draws."""
    draws = []

    def randn_tensor(shape, **kw):
        assert tuple(shape) == noise.shape
        draws.append(shape)
        return noise.to(kw.get("dtype") or noise.dtype)

    monkeypatch.setattr(module, "randn_tensor", randn_tensor)
    return draws


def test_flow_matches_flow_match_euler_stochastic(monkeypatch):
    pytest.importorskip("diffusers", reason="the scheduler comparison needs diffusers (pip install xjfast[dev])")
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.schedulers import scheduling_flow_match_euler_discrete as module
    sched = FlowMatchEulerDiscreteScheduler(shift=5.0, stochastic_sampling=True)
    sched.set_timesteps(4)
    x_t, v = latents(), latents()
    draws = injected_noise(monkeypatch, module, latent_noise(SEED, 6, x_t.shape))
    expected = sched.step(v, sched.timesteps[1], x_t).prev_sample  # step 1: sigmas[1] -> sigmas[2]
    assert len(draws) == 1
    sigma, sigma_next = sched.sigmas[1].item(), sched.sigmas[2].item()
    x0, x_next = denoise_step(x_t, v, sigma, sigma_next, noise_seed=SEED, frame_index=6)
    assert torch.allclose(x_next, expected, atol=1e-5)
    assert torch.allclose(x0, x_t - sigma * v, atol=1e-6)


def test_eps_matches_lcm_scheduler(monkeypatch):
    pytest.importorskip("diffusers", reason="the scheduler comparison needs diffusers (pip install xjfast[dev])")
    from diffusers import LCMScheduler
    from diffusers.schedulers import scheduling_lcm as module
    sched = LCMScheduler()
    sched.set_timesteps(4)
    x_t, eps = latents(), latents()
    draws = injected_noise(monkeypatch, module, latent_noise(SEED, 0, x_t.shape))
    t, t_prev = sched.timesteps[1], sched.timesteps[2]
    result = sched.step(eps, t, x_t)
    assert len(draws) == 1
    sigma = (1 - sched.alphas_cumprod[t]).sqrt().item()
    sigma_next = (1 - sched.alphas_cumprod[t_prev]).sqrt().item()
    x0, x_next = denoise_step(x_t, eps, sigma, sigma_next, prediction="eps", timestep=float(t), noise_seed=SEED)
    assert torch.allclose(x0, result.denoised, atol=1e-4, rtol=1e-4)
    assert torch.allclose(x_next, result.prev_sample, atol=1e-4, rtol=1e-4)


def test_eps_last_step_matches_lcm_without_noise():
    pytest.importorskip("diffusers", reason="the scheduler comparison needs diffusers (pip install xjfast[dev])")
    from diffusers import LCMScheduler
    sched = LCMScheduler()
    sched.set_timesteps(4)
    x_t, eps = latents(), latents()
    t = sched.timesteps[-1]
    result = sched.step(eps, t, x_t)  # the last step adds no noise: prev_sample is the denoised x0
    sigma = (1 - sched.alphas_cumprod[t]).sqrt().item()
    x0 = denoise_step(x_t, eps, sigma, prediction="eps", timestep=float(t))
    assert torch.allclose(x0, result.prev_sample, atol=1e-4, rtol=1e-4)


def test_x0_prediction_is_identity():
    x_t, pred = latents(), latents()
    assert torch.equal(denoise_step(x_t, pred, 0.4, prediction="x0"), pred)
    x0, x_next = denoise_step(x_t, pred, 0.4, 0.3, prediction="x0", noise_seed=4, frame_index=7)
    assert torch.equal(x0, pred)
    assert torch.allclose(x_next, 0.7 * pred + 0.3 * latent_noise(4, 7, x_t.shape), atol=1e-6)


def test_low_precision_computes_in_fp32():
    x_t, v = latents(), latents()
    x0 = denoise_step(x_t.bfloat16(), v.half(), 0.6)
    assert x0.dtype == torch.bfloat16
    assert torch.equal(x0, (x_t.bfloat16().float() - 0.6 * v.half().float()).bfloat16())


@pytest.mark.parametrize("patch", [(1, 2, 2), (2, 2, 1)])
def test_token_layout_equals_latent_layout(patch):
    x_t = latents()
    B, C, F, H, W = x_t.shape
    tokens = torch.randn(B, (F // patch[0]) * (H // patch[1]) * (W // patch[2]), patch[0] * patch[1] * patch[2] * C)
    v = unpatchify_wan(tokens, x_t.shape, patch)
    assert torch.equal(patchify(v, patch), tokens)  # the two test helpers are inverses
    a = denoise_step(x_t, v, 0.6, 0.2, noise_seed=1, frame_index=3)
    b = denoise_step(x_t, tokens, 0.6, 0.2, noise_seed=1, frame_index=3, patch_size=patch)
    assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_a_block_equals_its_frames_one_at_a_time():
    x_t, v = latents(F=4), latents(F=4)
    _, block = denoise_step(x_t, v, 0.8, 0.5, noise_seed=5, frame_index=10)
    frames = [denoise_step(x_t[:, :, f:f + 1], v[:, :, f:f + 1], 0.8, 0.5, noise_seed=5, frame_index=10 + f)[1]
              for f in range(4)]
    assert torch.equal(block, torch.cat(frames, dim=2))


def test_per_sample_sigma_and_out_buffers():
    x_t, v = latents(), latents()
    out = (torch.empty_like(x_t), torch.empty_like(x_t))
    x0, x_next = denoise_step(x_t, v, torch.tensor([0.9, 0.1]), 0.05, noise_seed=3, out=out)
    assert x0 is out[0] and x_next is out[1]
    assert torch.allclose(x0[1], x_t[1] - 0.1 * v[1], atol=1e-6)


@pytest.mark.parametrize("call, error, words", [
    (lambda x, v: denoise_step(x.int(), v, 0.5), TypeError, "x_t: expected dtype"),
    (lambda x, v: denoise_step(x, v.double(), 0.5), TypeError, "model_out: expected dtype"),
    (lambda x, v: denoise_step(x.tolist(), v, 0.5), TypeError, "x_t: expected a torch.Tensor"),
    (lambda x, v: denoise_step(x[0], v, 0.5), ValueError, "x_t: expected a 5-d"),
    (lambda x, v: denoise_step(x, v[:, :3], 0.5), ValueError, "model_out: expected the latent shape"),
    (lambda x, v: denoise_step(x, patchify(v)[:, 1:], 0.5), ValueError, "model_out: expected the latent shape"),
    (lambda x, v: denoise_step(x[..., :7], patchify(v), 0.5), ValueError, "not divisible by patch_size"),
    (lambda x, v: denoise_step(x, patchify(v), 0.5, patch_size=(1, 2, 4)), ValueError, "model_out: expected"),
    (lambda x, v: denoise_step(x, v.to("meta"), 0.5), ValueError, "model_out: expected a tensor on cpu"),
    (lambda x, v: denoise_step(x, v, 1.5), ValueError, r"sigma: expected finite values in \[0.0, 1.0\]"),
    (lambda x, v: denoise_step(x, v, float("nan")), ValueError, "sigma: expected finite values"),
    (lambda x, v: denoise_step(x, v, 0.5, -0.1, noise_seed=1), ValueError, "sigma_next: expected finite values"),
    (lambda x, v: denoise_step(x, v, torch.ones(3) / 2), ValueError, r"sigma: expected a number or a tensor of shape \[2\]"),
    (lambda x, v: denoise_step(x, v, 0.5, 0.2), ValueError, "noise_seed: required"),
    (lambda x, v: denoise_step(x, v, 0.5, 0.2, noise_seed=-1), ValueError, "noise_seed: expected an int"),
    (lambda x, v: denoise_step(x, v, 0.5, prediction="eps"), ValueError, "timestep: required"),
    (lambda x, v: denoise_step(x, v, 0.5, prediction="v"), ValueError, "prediction: expected one of"),
    (lambda x, v: denoise_step(x, v, 0.5, frame_index=-2), ValueError, "frame_index: expected an int in"),
    (lambda x, v: denoise_step(x, v, 0.5, out=torch.empty(3)), ValueError, "out: expected a contiguous tensor"),
    (lambda x, v: denoise_step(x, v, 0.5, out=torch.empty_like(x).half()), TypeError, "out: expected dtype"),
    (lambda x, v: denoise_step(x, v, 0.5, 0.2, noise_seed=1, out=torch.empty_like(x)), ValueError,
     r"out: expected a pair \(x0, x_next\)"),
    (lambda x, v: denoise_step(x, v, 0.5, backend="gpu"), ValueError, "backend: expected one of"),
    (lambda x, v: denoise_step(x, patchify(v), 0.5, patch_size=(0, 2, 2)), ValueError,
     r"patch_size: expected three positive ints \(pt, ph, pw\), got \(0, 2, 2\)"),
    (lambda x, v: denoise_step(x, v, 0.5, patch_size=(2, 2)), ValueError, "patch_size: expected three positive ints"),
    (lambda x, v: denoise_step(x, v, 0.5, noise_seed=1.5), ValueError, "noise_seed: expected an int"),
    (lambda x, v: denoise_step(x, v, "half"), TypeError, r"sigma: expected a number or a tensor of shape \[2\]"),
    # a bool is no noise level (True would be read as sigma 1), nor a complex one (its imaginary part dropped)
    (lambda x, v: denoise_step(x, v, True), TypeError, r"sigma: expected a number or a tensor of shape \[2\].*True"),
    (lambda x, v: denoise_step(x, v, torch.tensor([True, False])), TypeError, "sigma: expected a number"),
    (lambda x, v: denoise_step(x, v, [True, False]), TypeError, "sigma: expected a number"),
    (lambda x, v: denoise_step(x, v, torch.full((2,), 0.5 + 0.5j)), TypeError, "sigma: expected a number"),
    (lambda x, v: denoise_step(x, v, 0.5, True, noise_seed=1), TypeError, "sigma_next: expected a number"),
    (lambda x, v: denoise_step(x, v, 0.5, prediction="eps", timestep=True), TypeError, "timestep: expected a number"),
    (lambda x, v: denoise_step(x, v, 0.5, 0.2, noise_seed=1, out=(x.clone(),) * 2), ValueError,
     "out: expected x0 and x_next in separate memory"),
    (lambda x, v: denoise_step(x[:0], v[:0], 0.5, backend="gpu"), ValueError, "backend: expected one of"),
])
def test_bad_input_names_the_argument(call, error, words):
    with pytest.raises(error, match=words):
        call(latents(), latents())


@pytest.mark.parametrize("backend", ["reference"] + fast_backends("denoise_step"))
@pytest.mark.parametrize("shape", [(0, 4, 1, 8, 8), (1, 4, 0, 8, 8)])
def test_empty_latents_give_empty_outputs(backend, shape):
    x = torch.randn(shape, device=DEVICE)
    x0, x_next = denoise_step(x, x, 0.5, 0.2, noise_seed=1, backend=backend)
    assert x0.shape == x_next.shape == shape


def test_cuda_backend_takes_model_out_in_the_latents_dtype_only():
    """The CUDA kernel reads one element type: an fp32 model_out with bf16 latents goes elsewhere
    (auto) rather than be rounded to bf16 before the fp32 arithmetic."""
    from xjfast.backends import implementations
    supports = implementations("denoise_step")["cuda"].supports
    x = latents(dtype=torch.bfloat16)
    assert supports(x, x) is None
    assert supports(x, x.float()) == ("the CUDA kernel reads model_out in x_t's dtype (torch.bfloat16), got "
                                      "torch.float32 (backend='triton' reads both)")


@pytest.mark.parametrize("backend, kernel", [("triton", "Triton"), ("cuda", "CUDA")])
def test_fast_backends_refuse_more_latent_frames_than_a_grid_axis_holds(backend, kernel):
    """Both kernels put the latent frames on a grid axis a GPU limits to 65535: beyond it auto goes
    elsewhere, rather than a launch that fails (or the bindings' ValueError)."""
    from xjfast.backends import implementations
    supports = implementations("denoise_step")[backend].supports
    x = torch.empty(1, 1, 1, 1, 4).expand(1, 1, 65536, 1, 4)  # no memory behind the frames
    assert supports(x, x) == f"the {kernel} kernel puts latent frames on a grid axis of at most 65535 programs, got 65536"
    assert supports(x[:, :, :65535], x[:, :, :65535]) is None


def test_cuda_backend_refuses_latent_sizes_past_int32():
    """The bindings take the latent shape as C++ ints: a larger size goes elsewhere (auto) rather
    than reach pybind11's TypeError."""
    from xjfast.backends import implementations
    supports = implementations("denoise_step")["cuda"].supports
    x = torch.empty(1, 1, 1, 1, 1).expand(1, 1, 1, 1, 2**31)  # no memory behind the row
    assert supports(x, x) == "the CUDA kernel takes latent sizes below 2^31, got shape (1, 1, 1, 1, 2147483648)"
    assert supports(x[..., :-1], x[..., :-1]) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where no GPU is present")
def test_cuda_backend_unavailable_says_why():
    with pytest.raises(BackendUnavailable, match="denoise_step: backend 'cuda' is unavailable: [a-z]+"):
        denoise_step(latents(), latents(), 0.5, backend="cuda")


CASES = [("flow", {}, False), ("flow", {}, True), ("x0", {}, True), ("eps", dict(timestep=700.0), True)]


@pytest.mark.parametrize("backend", fast_backends("denoise_step"))
@pytest.mark.parametrize("prediction, extra, tokens", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("W", [12, 10])  # rows of whole groups of 4 (vector accesses) or not
def test_fast_backend_matches_reference(backend, prediction, extra, tokens, dtype, W):
    x_t, m = latents(F=3, W=W, dtype=dtype).to(DEVICE), latents(F=3, W=W, dtype=dtype).to(DEVICE)
    m = patchify(m) if tokens else m.transpose(3, 4).contiguous().transpose(3, 4)  # a strided latent view
    kwargs = dict(prediction=prediction, noise_seed=SEED, frame_index=2 ** 33 + 1, **extra)
    ref = denoise_step(x_t, m, 0.7, 0.3, backend="reference", **kwargs)
    out = (poisoned(x_t.shape, dtype), poisoned(x_t.shape, dtype))
    fast = denoise_step(x_t, m, 0.7, 0.3, backend=backend, out=out, **kwargs)
    for r, f in zip(ref, fast):
        assert not f.isnan().any()
        # the same fp32 arithmetic; Gaussians agree to float32 rounding of log/cos/sin (DESIGN.md)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        assert (f.float() - r.float()).abs().max() <= tol * max(1.0, r.float().abs().max().item())


@pytest.mark.gpu
@pytest.mark.parametrize("backend", fast_backends("denoise_step"))
def test_fast_backend_stream_shape(backend):
    """Wan2.1 480x832 latents: 16 x 60 x 104 per frame, head tokens of 2x2 patches."""
    x_t = torch.randn(1, 16, 3, 60, 104, device=DEVICE, dtype=torch.bfloat16)
    v = patchify(torch.randn(1, 16, 3, 60, 104, device=DEVICE, dtype=torch.bfloat16))
    ref = denoise_step(x_t, v, 0.9, 0.4, noise_seed=SEED, frame_index=1000, backend="reference")
    out = (poisoned(x_t.shape, x_t.dtype), poisoned(x_t.shape, x_t.dtype))
    fast = denoise_step(x_t, v, 0.9, 0.4, noise_seed=SEED, frame_index=1000, backend=backend, out=out)
    for r, f in zip(ref, fast):
        assert not f.isnan().any()
        # one bf16 rounding apart at most (an absolute 3e-2 was less than one bf16 step at |x| >= 4)
        assert (f.float() - r.float()).abs().max() <= 1e-2 * max(1.0, r.float().abs().max().item())


FRAMES = [0, 1, 37, 2 ** 31 - 1, 2 ** 33 + 1]  # 2^31 - 1: frames past it of a block are beyond int32


@pytest.mark.parametrize("backend", ["reference"] + fast_backends("denoise_step"))
@pytest.mark.parametrize("frame", FRAMES)
def test_frame_index_in_device_memory_draws_the_same_noise(backend, frame):
    """A step replayed from a CUDA graph reads its frame index from an int64 0-d tensor: the same
    bits as the int form, in every backend (the reference is the CPU path of that replay too)."""
    x_t, m = latents(F=3).to(DEVICE), patchify(latents(F=3)).to(DEVICE)
    by_int = denoise_step(x_t, m, 0.7, 0.3, noise_seed=SEED, frame_index=frame, backend=backend)
    out = (poisoned(x_t.shape, x_t.dtype), poisoned(x_t.shape, x_t.dtype))
    index = torch.tensor(frame, device=DEVICE)
    by_tensor = denoise_step(x_t, m, 0.7, 0.3, noise_seed=SEED, frame_index=index, backend=backend, out=out)
    assert all(torch.equal(a, b) for a, b in zip(by_int, by_tensor))
    index += 1  # the kernels read the index at run time: the next frame's noise
    _, next_frame = denoise_step(x_t, m, 0.7, 0.3, noise_seed=SEED, frame_index=index, backend=backend)
    assert torch.equal(next_frame, denoise_step(x_t, m, 0.7, 0.3, noise_seed=SEED, frame_index=frame + 1,
                                                backend=backend)[1])
    assert not torch.equal(next_frame, by_int[1])


@pytest.mark.parametrize("frame", FRAMES)
def test_latent_noise_with_a_tensor_frame_index(frame):
    shape = (2, 4, 3, 6, 8)
    assert torch.equal(latent_noise(SEED, torch.tensor(frame), shape), latent_noise(SEED, frame, shape))


@pytest.mark.parametrize("index, words", [
    (torch.tensor(3, dtype=torch.int32), "frame_index: expected an int or a 0-d int64 tensor"),
    (torch.tensor([3]), r"frame_index: expected an int or a 0-d int64 tensor, got a tensor of dtype torch.int64 "
                        r"and shape \(1,\)"),
    (torch.tensor(3, device="meta"), "frame_index: expected a tensor on cpu"),
    (2 ** 63, "frame_index: expected an int in"),
])
def test_bad_frame_index_names_the_argument(index, words):
    with pytest.raises(ValueError, match=words):
        denoise_step(latents(), latents(), 0.5, 0.2, noise_seed=1, frame_index=index)
