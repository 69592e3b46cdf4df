"""The CUDA sources' shared __host__ __device__ code (Philox, e4m3, mma fragments), compiled for the host."""
import os
import shutil
import subprocess

import pytest
import torch

from xjfast.ops.philox import philox_normal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CXX = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


@pytest.fixture(scope="module")
def host_tests(tmp_path_factory):
    if CXX is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path_factory.mktemp("csrc") / "host_tests"
    subprocess.run([CXX, "-std=c++17", "-O2", "-Wall", "-Werror", "-I", os.path.join(ROOT, "csrc"),
                    os.path.join(ROOT, "csrc", "host_tests.cpp"), "-o", str(exe)], check=True)
    return str(exe)


def run(exe, *args, stdin=None):
    return subprocess.run([exe, *map(str, args)], input=stdin, capture_output=True, text=True, check=True).stdout


def test_philox_known_answers(host_tests):
    kat = [(("0x0",) * 4 + ("0x0",) * 2, "6627e8d5 e169c58d bc57ac4c 9b00dbd8"),
           (("0xffffffff",) * 6, "408f276d 41c83b0e a20bc7c6 6d5451fd"),
           (("0x243f6a88", "0x85a308d3", "0x13198a2e", "0x03707344", "0xa4093822", "0x299f31d0"),
            "d16cfe09 94fdcceb 5001e420 24126ea1")]
    for args, expected in kat:
        assert run(host_tests, "philox", *args).strip() == expected


def test_gaussians_match_the_reference(host_tests):
    seed, frame = 2 ** 40 + 3, 2 ** 33 + 7
    host = torch.tensor([float(x) for x in run(host_tests, "normal", seed, frame, 1000).split()])
    assert (host - philox_normal(seed, frame, 1000)).abs().max() < 1e-5


def test_e4m3_conversion_matches_torch_on_every_class_of_value(host_tests):
    g = torch.Generator().manual_seed(0)
    values = torch.cat([
        torch.randn(4000, generator=g) * torch.exp(torch.randn(4000, generator=g) * 4),  # every exponent
        torch.tensor([0.0, -0.0, 448.0, 449.0, 464.0, 480.0, 1e9, -1e9, 2.0 ** -6, 2.0 ** -9, 2.0 ** -10,
                      3 * 2.0 ** -11, 0.0068359375, 7.79]),                                   # edges and ties
        torch.arange(0, 256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()[:127],     # exact codes
    ])
    values = values[torch.isfinite(values)]
    lines = run(host_tests, "e4m3", stdin="\n".join(f"{v:.9g}" for v in values.tolist())).split("\n")
    host = torch.tensor([int(line.split()[0]) for line in lines if line], dtype=torch.uint8)
    parsed = torch.tensor([float(f"{v:.9g}") for v in values.tolist()])
    expected = parsed.clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
    assert torch.equal(host, expected)


def test_attention_mma_fragments_follow_the_ptx_layouts(host_tests):
    """The CUDA attention kernel's operand gathering (csrc/mma_fragments.cuh: ldmatrix addresses, the
    P operand built from S accumulators, V transposed into P's key order), run on the host against
    the PTX ISA's m16n8k32 e4m3 layouts: S = Q.K^T and O = e4m3(448 P).V come out exactly."""
    seed = torch.randint(0, 2**31, ()).item()
    assert run(host_tests, "fragments", seed).strip() == "ok", f"seed {seed}"


@pytest.mark.parametrize("D", [64, 128])
def test_attention_wgmma_tiles_follow_the_ptx_layouts(host_tests, D):
    """The sm_90a path: Q, K and V^T tiles written in the core-matrix layout the kernel uses, read back
    through its wgmma descriptors as the PTX ISA defines K-major no-swizzle operands, P from
    registers: S and O exact (a consistent mistake in the K order would still give S; O catches it)."""
    seed = torch.randint(0, 2**31, ()).item()
    assert run(host_tests, "wgmma", seed, D).strip() == "ok", f"seed {seed}"


@pytest.mark.parametrize("D", [64, 128])
def test_attention_tma_tiles_follow_the_swizzle_modes(host_tests, D):
    """The warp-specialized kernel: K and V tiles as TMA writes them with the D-byte swizzle, K read by
    wgmma through swizzled descriptors (mode, stride, k-step start) and V through swizzled_offset by
    the transpose: S and O exact. A wrong XOR width, mode, group stride or k-step start fails."""
    seed = torch.randint(0, 2**31, ()).item()
    assert run(host_tests, "wgmma-tma", seed, D).strip() == "ok", f"seed {seed}"


@pytest.mark.parametrize("D", [64, 128])
def test_shared_memory_passes_are_free_of_bank_conflicts(host_tests, D):
    """host_tests banks, with the kernels' own index functions. The V-tile transpose of each CUDA
    attention path: every load and store instruction of a warp touches each shared-memory bank
    once, but the ws path's loads from rows of 64 swizzled bytes, two to a bank (its rows of one
    parity share 16 banks). The query tile's stores into core matrices (wgmma, ws): once per
    bank too (taking a row's segments in turn, they were 8-way at head_dim 128); the partial sums
    of q.mean, 4-byte stores a few times per unit, two to a bank at head_dim 128."""
    got = {name: tuple(map(int, degrees)) for name, *degrees in
           (line.split() for line in run(host_tests, "banks", D).strip().splitlines())}
    assert got == {"mma": (1, 1), "wgmma": (1, 1), "ws": (2 if D == 64 else 1, 1), "query": (1, 1 if D == 64 else 2)}



@pytest.mark.parametrize("shape, patch, element", [
    ((1, 16, 3, 60, 104), (1, 2, 2), (0, 7, 2, 59, 103)),
    # pt * ph > 2^31 (F <= 65535, H any): the channel index passes INT_MAX before it is scaled
    ((1, 1, 32769, 65536, 4), (32769, 65536, 4), (0, 0, 32768, 65535, 3)),
])
def test_denoise_token_offset_is_exact_past_int32(host_tests, shape, patch, element):
    """denoise_step's model_out offset in the token layout (csrc/denoise_layout.h), against Wan2.1's
    unpatchify order computed in Python integers."""
    B, C, F, H, W = shape
    pt, ph, pw = patch
    b, c, f, y, x = element
    channels = pt * ph * pw * C
    strides = ((F // pt) * (H // ph) * (W // pw) * channels, channels, 1)
    token = ((f // pt) * (H // ph) + y // ph) * (W // pw) + x // pw
    channel = (((f % pt) * ph + y % ph) * pw + x % pw) * C + c
    expected = b * strides[0] + token * strides[1] + channel * strides[2]
    assert int(run(host_tests, "token-offset", *shape, *patch, *strides, *element)) == expected
