"""Philox4x32-10 against the published known-answer vectors, and the Gaussian mapping."""
import math

import torch

from xjfast.ops.philox import latent_noise, philox4x32_10, philox_normal

# Known-answer vectors of Random123 (Salmon et al., SC'11), as in ../shared/philox_kat.json.
KAT = [
    ([0x00000000] * 4, [0x00000000] * 2, [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
    ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
    ([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0],
     [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]),
]


def test_known_answer_vectors():
    counter = torch.tensor([c for c, _, _ in KAT])
    key = torch.tensor([k for _, k, _ in KAT])
    assert philox4x32_10(counter, key).tolist() == [o for _, _, o in KAT]


def test_gaussian_mapping_of_one_element():
    """Element 4g+3 of frame f is r2 sin(2 pi u3) of Philox((g, 0, f, 0), (seed lo, seed hi))."""
    seed, frame, g = 2 ** 33 + 17, 5, 9
    words = philox4x32_10(torch.tensor([g, 0, frame, 0]), torch.tensor([17, 2]))
    u2, u3 = ((words[2:].float() + 1) * 2.0 ** -32).tolist()
    expected = math.sqrt(-2 * math.log(u2)) * math.sin(2 * math.pi * u3)
    assert abs(philox_normal(seed, frame, 40)[4 * g + 3].item() - expected) < 1e-5


def test_statistics():
    z = philox_normal(1234, 0, 1_000_000)
    assert abs(z.mean().item()) < 5e-3 and abs(z.std().item() - 1) < 5e-3
    assert torch.isfinite(z).all()


def test_frames_are_independent_of_blocking():
    shape = (2, 4, 3, 6, 8)
    block = latent_noise(9, 3, shape)
    one_by_one = torch.cat([latent_noise(9, 3 + f, (2, 4, 1, 6, 8)) for f in range(3)], dim=2)
    assert torch.equal(block, one_by_one)


def test_streams_differ_by_seed_and_frame():
    a = philox_normal(1, 0, 64)
    assert not torch.equal(a, philox_normal(2, 0, 64)) and not torch.equal(a, philox_normal(1, 1, 64))
    assert torch.equal(a, philox_normal(1, 0, 64))
