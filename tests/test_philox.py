"""Philox4x32-10 against the published known-answer vectors, and the Gaussian mapping."""
import math
import random

import pytest
import torch

from xjfast.ops.philox import latent_noise, philox4x32_10, philox_normal, uniform

# Known-answer vectors of Random123 (Salmon et al., SC'11), copied from ../shared/philox_kat.json
# so that the test does not depend on where that file lives.
KAT = [
    ([0x00000000] * 4, [0x00000000] * 2, [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
    ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
    ([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0],
     [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]),
]


def philox_by_hand(c, k):
    """Philox4x32-10 on Python ints, the paper's round written out: an oracle independent of the
    int64 tensor arithmetic (the 64-bit products are exact here)."""
    c, k = list(c), list(k)
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k[0], p1 & 0xFFFFFFFF, (p0 >> 32) ^ c[3] ^ k[1], p0 & 0xFFFFFFFF]
        k = [(k[0] + 0x9E3779B9) & 0xFFFFFFFF, (k[1] + 0xBB67AE85) & 0xFFFFFFFF]
    return c


def test_known_answer_vectors():
    counter = torch.tensor([c for c, _, _ in KAT])
    key = torch.tensor([k for _, k, _ in KAT])
    assert philox4x32_10(counter, key).tolist() == [o for _, _, o in KAT]
    assert [philox_by_hand(c, k) for c, k, _ in KAT] == [o for _, _, o in KAT]


def test_matches_python_integers_on_random_words():
    """The 16-bit split of the 32x32 products holds over the whole range, edge words included."""
    rng = random.Random(0)
    words = [0, 1, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]
    cases = [([rng.choice(words) for _ in range(4)], [rng.choice(words) for _ in range(2)]) for _ in range(50)]
    cases += [([rng.getrandbits(32) for _ in range(4)], [rng.getrandbits(32) for _ in range(2)]) for _ in range(200)]
    got = philox4x32_10(torch.tensor([c for c, _ in cases]), torch.tensor([k for _, k in cases]))
    assert got.tolist() == [philox_by_hand(c, k) for c, k in cases]


def test_uniform_is_in_the_half_open_unit_interval():
    u = uniform(torch.tensor([0, 1, 0xFFFFFF7F, 0xFFFFFF80, 0xFFFFFFFF]))
    assert u.dtype == torch.float32
    assert u.tolist() == [2.0 ** -32, 2.0 ** -31, 1 - 2.0 ** -24, 1.0, 1.0]


def test_element_order_of_one_group():
    """Elements 4g..4g+3 of frame f are r0 cos(2 pi u1), r0 sin(2 pi u1), r2 cos(2 pi u3),
    r2 sin(2 pi u3) of Philox((g lo, g hi, f lo, f hi), (seed lo, seed hi)); high words nonzero."""
    seed, frame, g = 2 ** 33 + 17, 2 ** 32 + 5, 9
    x = philox_by_hand([g, 0, 5, 1], [17, 2])
    u = ((torch.tensor(x, dtype=torch.float64).float() + 1) * 2.0 ** -32).tolist()  # float32, as kernels do
    r0, r2 = math.sqrt(-2 * math.log(u[0])), math.sqrt(-2 * math.log(u[2]))
    expected = [r0 * math.cos(2 * math.pi * u[1]), r0 * math.sin(2 * math.pi * u[1]),
                r2 * math.cos(2 * math.pi * u[3]), r2 * math.sin(2 * math.pi * u[3])]
    got = philox_normal(seed, frame, 4 * g + 6)[4 * g:4 * g + 4].tolist()
    assert max(abs(a - b) for a, b in zip(got, expected)) < 1e-5


def test_statistics():
    z = philox_normal(1234, 0, 1_000_000)
    assert z.dtype == torch.float32 and torch.isfinite(z).all()
    # 5 standard errors: mean 1e-3, std about 7e-4
    assert abs(z.mean().item()) < 5e-3 and abs(z.std().item() - 1) < 5e-3


def test_frames_are_independent_of_blocking():
    block = latent_noise(9, 3, (2, 4, 3, 6, 8))
    one_by_one = torch.cat([latent_noise(9, 3 + f, (2, 4, 1, 6, 8)) for f in range(3)], dim=2)
    assert torch.equal(block, one_by_one)
    assert torch.equal(block[:, :, 1].flatten(), philox_normal(9, 4, 2 * 4 * 6 * 8))


def test_streams_differ_by_seed_and_frame():
    a = philox_normal(1, 0, 64)
    for other in (philox_normal(2, 0, 64), philox_normal(1, 1, 64), philox_normal(1 + 2 ** 32, 0, 64),
                  philox_normal(1, 2 ** 32, 64)):
        assert (a != other).all()
    assert torch.equal(a, philox_normal(1, 0, 64))
    assert torch.equal(philox_normal(1, 0, 6), a[:6])  # a prefix does not depend on numel


@pytest.mark.parametrize("call, words", [
    (lambda: philox_normal(-1, 0, 8), "noise_seed: expected an int"),
    (lambda: philox_normal(2 ** 64, 0, 8), "noise_seed: expected an int"),
    (lambda: philox_normal(1, -1, 8), "frame_index: expected an int"),
    (lambda: philox_normal(1, 0, -8), "numel: expected an int"),
    (lambda: philox4x32_10(torch.zeros(3, dtype=torch.long), torch.zeros(2, dtype=torch.long)), "counter, key"),
])
def test_bad_arguments_are_named(call, words):
    with pytest.raises(ValueError, match=words):
        call()


def test_a_negative_frame_index_in_memory_reads_as_the_kernels_read_it():
    """A tensor index is read on the device without a check: -1 is 2^64 - 1 there, as in the kernels."""
    assert torch.equal(philox_normal(1, torch.tensor(-1), 64), philox_normal(1, 2 ** 64 - 1, 64))


def test_a_frame_index_on_a_device_named_without_its_index():
    """"cpu:0" (as "cuda" on a GPU) names the device its tensors report without the index."""
    assert torch.equal(philox_normal(1, torch.tensor(3), 64, device="cpu:0"), philox_normal(1, 3, 64))
