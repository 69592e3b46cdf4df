"""kv_cache_compact: every backend keeps the same tokens, quantized the same way."""
import pytest
import torch

from xjfast.ops.kv_cache_compact import kv_cache_compact, select_keep

from backends import DEVICE, fast_backends

E4M3 = torch.float8_e4m3fn


def page(B, T, H, D, dtype):
    k = (torch.randn(B, T, H, D, device=DEVICE) * 4).to(dtype)
    v = (torch.randn(B, T, H, D, device=DEVICE) * 4).to(dtype)
    return [k, v, torch.rand(B, H, device=DEVICE) + 0.1, torch.randn(B, H, D, device=DEVICE),
            torch.rand(B, H, D, device=DEVICE) + 0.1]


def run(backend, dtype, B=2, K=12, T=16, H=2, D=64, evictions=3):
    torch.manual_seed(7)
    pages = [page(B, T, H, D, dtype) for _ in range(evictions)]
    masses = [torch.rand(B, T, device=DEVICE) for _ in range(evictions)]
    keep = page(B, K, H, D, dtype)
    keep_mass, count = torch.zeros(B, K, device=DEVICE), 0
    for p, m in zip(pages, masses):
        count = kv_cache_compact(keep, keep_mass, count, p, m, backend=backend)
    return keep, keep_mass, count


def dequantized(keep):
    k, v, ks, km, vs = keep
    return k.float() * ks[:, None, :, None] + km[:, None], v.float() * vs[:, None]


def test_reference_keeps_the_heaviest_candidates_oldest_first():
    mass_keep = torch.tensor([[0.9, 0.1, 0.5]])
    mass_page = torch.tensor([[0.2, 0.95, 0.05, 0.6]])
    top, mass = select_keep(torch.cat([mass_keep, torch.zeros(1, 0)], 1), 3, mass_page)
    assert top.tolist() == [[0, 4, 6]] and torch.allclose(mass, torch.tensor([[0.9, 0.95, 0.6]]))


@pytest.mark.parametrize("backend", fast_backends("kv_cache_compact"))
@pytest.mark.parametrize("dtype", [E4M3, torch.bfloat16])
def test_compact_matches_reference(backend, dtype):
    ref_keep, ref_mass, ref_count = run("reference", dtype)
    out_keep, out_mass, out_count = run(backend, dtype)
    assert out_count == ref_count == 12 and torch.equal(out_mass, ref_mass)
    for r, o in zip(dequantized(ref_keep), dequantized(out_keep)):
        assert ((o - r).norm() / r.norm()) < 1e-2
