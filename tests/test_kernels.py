"""kernels.py: each fused kernel gives its NumPy reference's result bit for bit."""
import numpy as np
import pytest

import data_loader
import kernels
import optim

pytestmark = pytest.mark.skipif(not kernels.ENABLED, reason="Numba is not installed")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("momentum,nesterov,reg", [(0.0, False, 0.0), (0.9, False, 1e-3),
                                                   (0.9, True, 5e-4)])
def test_sgd_update_is_the_reference_bit_for_bit(dtype, momentum, nesterov, reg):
    rng = np.random.default_rng(0)
    p, g, v = (rng.standard_normal(10_007).astype(dtype) for _ in range(3))
    v = v if momentum else v[:0]
    ours = [a.copy() for a in (p, g, v)]
    scalars = [dtype(x) for x in (0.05, momentum, reg)]
    optim.SGD.update(p, g, v, *scalars, nesterov)
    kernels.sgd_update(*ours, *scalars, nesterov)
    assert np.array_equal(ours[0], p) and np.array_equal(ours[2], v)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rotate", [0, 30])
def test_make_batch_is_gather_warp_and_normalize_bit_for_bit(dtype, rotate):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(50, 3072), dtype=np.uint8)
    mean, std = data_loader.compute_stats(images)
    idx = rng.permutation(50)[:17]
    flips, shifts, turns = data_loader.draw_augmentation(17, rng, True, 16, rotate)
    out = np.empty((17, 3072), dtype)  # shifts as far as --translate goes
    kernels.make_batch(images, idx, flips, shifts, turns, mean, std, out)
    reference = data_loader.normalize(data_loader.warp(images[idx], flips, shifts, turns),
                                      mean, std, np.empty((17, 3072), dtype))
    assert np.array_equal(out, reference)
