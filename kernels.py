"""Fused kernels: the same work as a NumPy reference elsewhere, in one pass over memory.

NumPy runs each elementwise operation as its own pass over memory; between the matrix products
of a training step that costs as much as the products themselves. Each kernel here is a plain
loop that reads as its formula, compiled by Numba (and cached on disk, so a later run loads it
in a fraction of a second). It computes in the same order as its reference, so the results are
the same bit for bit (tests/test_kernels.py). Without Numba, or with the environment variable
MLP_KERNELS=numpy, ENABLED is False and the references run. Callers ask `enabled()`: a Numba
that is installed but does not load turns the kernels off with one warning, and one with no
folder to cache in compiles them each run, with another.

The kernels run on the calling core only. Between products, OpenBLAS keeps its other threads
spinning on the other cores; a second pool of threads fighting them for those cores made the
whole step slower, not faster (measured with benchmark.py --profile: see the README).
"""
import functools
import importlib.util
import os

import numpy as np

import cli

AVAILABLE = importlib.util.find_spec("numba") is not None
ENABLED = AVAILABLE and os.environ.get("MLP_KERNELS", "") != "numpy"


def enabled():
    """Whether the kernels run: ENABLED, and Numba loads (it is imported here, at the first
    batch). If it does not, one line says so and the references run from then on."""
    global ENABLED
    if ENABLED:
        try:
            import numba  # noqa: F401
        except Exception as exc:  # e.g. built for another NumPy: ImportError, or worse
            ENABLED = False
            cli.warn(f"Numba is installed but does not load ({exc}), so the NumPy references "
                     f"run instead (slower); MLP_KERNELS=numpy runs them without this warning")
    return ENABLED


def _compiled(kernel):
    """`kernel`, compiled and cached on disk at its first call: Numba is loaded only when a
    kernel runs, not by every script that imports this."""
    @functools.wraps(kernel)
    def run(*args):
        if run.compiled is None:
            import numba
            try:
                run.compiled = numba.njit(cache=True)(kernel)
            except RuntimeError as exc:  # no folder it may cache in: compile, don't cache
                cli.warn(f"the kernel {kernel.__name__} is compiled again each run: {exc}; "
                         f"set NUMBA_CACHE_DIR to a writable folder to keep it")
                run.compiled = numba.njit(kernel)
        return run.compiled(*args)
    run.compiled = None
    return run


# --- optim.SGD's update (reference: optim.SGD.update) -----------------------------------------


@_compiled
def sgd_update(p, g, v, lr, momentum, reg, nesterov):
    """p, v <- one SGD step on flat arrays, with L2 `reg` and momentum (v of size 0: none)."""
    for i in range(p.size):
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
def make_batch(images, idx, flips, shifts, turns, mean, std, out):
    """out[i] = (image idx[i] mirrored if flips[i], turned by turns[i] = (cos, sin) of its
    angle, shifted by shifts[i], - mean) / std, for uint8 images in CIFAR layout (3 planes of
    32 x 32): data_loader.warp, then data_loader.normalize."""
    for i in range(len(idx)):
        image, dy, dx = images[idx[i]], shifts[i, 0], shifts[i, 1]
        cos, sin = turns[i, 0], turns[i, 1]

        def pixel(c, r, q):  # plane c of the image at row r, column q; 0 off the image
            inside = 0 <= r < 32 and 0 <= q < 32
            return np.float64(image[c * 1024 + r * 32 + q]) if inside else 0.0

        for c in range(3):
            for y in range(32):
                row = c * 1024 + y * 32
                for x in range(32):
                    if sin == 0:  # whole pixels: the one it came from
                        value = pixel(c, y - dy, 31 - (x - dx) if flips[i] else x - dx)
                    else:  # between the four pixels nearest to where it came from
                        u, v = x - dx - 15.5, y - dy - 15.5
                        sx, sy = cos * u + sin * v + 15.5, -sin * u + cos * v + 15.5
                        sx = 31 - sx if flips[i] else sx
                        x0, y0 = int(np.floor(sx)), int(np.floor(sy))
                        fx, fy = sx - x0, sy - y0
                        value = ((1 - fy) * ((1 - fx) * pixel(c, y0, x0)
                                             + fx * pixel(c, y0, x0 + 1))
                                 + fy * ((1 - fx) * pixel(c, y0 + 1, x0)
                                         + fx * pixel(c, y0 + 1, x0 + 1)))
                    # In float32 as NumPy's normalize does, then divided in out's type.
                    out[i, row + x] = np.float32(value) - mean[row + x]
                    out[i, row + x] /= std[row + x]
