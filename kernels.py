"""Fused kernels: the same work as a NumPy reference elsewhere, in one pass over memory and on
every core. NumPy runs each elementwise operation as its own pass over memory, on one core;
between the matrix products of a training step that costs as much as the products themselves.

Each kernel is a plain loop that reads as its formula, compiled by Numba (and cached on disk,
so a later run loads it in a fraction of a second). It computes in the same order as its
reference, so the results are the same bit for bit (tests/test_kernels.py). Without Numba,
or with the environment variable MLP_KERNELS=numpy, ENABLED is False and the references run.
"""
import functools
import importlib.util
import os

import numpy as np

AVAILABLE = importlib.util.find_spec("numba") is not None
ENABLED = AVAILABLE and os.environ.get("MLP_KERNELS", "") != "numpy"
prange = range  # numba.prange once Numba is loaded: the loops below it run on every core


def _compiled(kernel):
    """`kernel`, compiled for all cores (its prange loops) and cached on disk at its first
    call: Numba is loaded only when a kernel runs, not by every script that imports this."""
    @functools.wraps(kernel)
    def run(*args):
        if run.compiled is None:
            global prange
            import numba
            prange = numba.prange
            run.compiled = numba.njit(parallel=True, cache=True)(kernel)
        return run.compiled(*args)
    run.compiled = None
    return run


# --- optim.SGD's update (reference: optim.SGD.update) -----------------------------------------


@_compiled
def sgd_update(p, g, v, lr, momentum, reg, nesterov):
    """p, v <- one SGD step on flat arrays, with L2 `reg` and momentum (v of size 0: none)."""
    for i in prange(p.size):
        step = (g[i] + reg * p[i]) * lr
        if v.size == 0:
            p[i] -= step
        else:
            v[i] = v[i] * momentum - step
            if nesterov:  # look ahead: p += momentum * v_new - step
                p[i] = (p[i] - step) + v[i] * momentum
            else:
                p[i] += v[i]


# --- data_loader.make_batch (reference: gather, augment, then normalize) ----------------------


@_compiled
def make_batch(images, idx, flips, shifts, mean, std, out):
    """out[i] = (image idx[i], mirrored if flips[i], shifted by shifts[i] with the uncovered
    border 0, - mean) / std, for uint8 images in CIFAR layout (3 planes of 32 x 32)."""
    for i in prange(len(idx)):
        image, dy, dx = images[idx[i]], shifts[i, 0], shifts[i, 1]
        for c in range(3):
            for y in range(32):
                for x in range(32):
                    k, sy, sx = c * 1024 + y * 32 + x, y - dy, x - dx
                    value = np.uint8(0)  # as the images: uint8 - float32 is float32
                    if 0 <= sy < 32 and 0 <= sx < 32:
                        value = image[c * 1024 + sy * 32 + (31 - sx if flips[i] else sx)]
                    out[i, k] = value - mean[k]  # in float32, then divided in out's type,
                    out[i, k] /= std[k]  # as NumPy's normalize does
