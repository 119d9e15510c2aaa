"""The data a batch is made of: CIFAR-10 split, normalised, whitened and augmented.

    train_x, train_y, test_x, test_y = load_data("data")
    train_x, train_y, val_x, val_y = split_validation(train_x, train_y, val_size=5000, seed=0)
    prep, _ = fit_preprocessing(train_x, whiten=384)    # from the training split only
    x = preprocess(augment(train_x[:128], rng, flip=True, translate=2), prep)

Images stay uint8 rows of 3072 values (R, G and B planes of 32x32) until a batch is made:
each batch is gathered, augmented and preprocessed on its own, so the float dataset is never
built. Fetching and reading the files is `cifar10.py`'s.
"""
from collections import namedtuple

import numpy as np

import cifar10
import cli
import kernels
from cifar10 import CLASS_NAMES, IMAGE_SHAPE, N_CLASSES, PIXELS, DataError  # noqa: F401


def load_data(data_dir="data", url=None, md5=None, progress=True):
    """The CIFAR-10 training and test sets, downloaded and extracted into `data_dir` if needed
    (see `cifar10.fetch`). Returns train_images, train_labels, test_images, test_labels."""
    return cifar10.read_folder(cifar10.fetch(data_dir, url, md5, progress))


# --- the validation split and the statistics of the training split ----------------------------


def split_validation(images, labels, val_size=5000, seed=0):
    """Hold out `val_size` images, stratified by class, chosen by `seed`.

    Each class gives val_size * its share of the images (500 each for CIFAR-10's 5000);
    the remainder goes to the classes with the largest fractional shares, ties drawn at
    random. Returns train_images, train_labels, val_images, val_labels (copies, in order).
    """
    labels = np.asarray(labels)
    n = len(labels)
    if len(images) != n:
        raise ValueError(f"{len(images)} images but {n} labels")
    if not 0 < val_size < n:
        raise DataError(f"--val-size must be between 1 and {n - 1} (the number of training "
                        f"images minus one), got {val_size}")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota, remainder = np.divmod(val_size * counts, n)  # exact integer shares
    short = val_size - quota.sum()
    quota[np.lexsort((rng.random(len(classes)), -remainder))[:short]] += 1
    is_val = np.zeros(n, bool)
    for c, q in zip(classes, quota):
        is_val[rng.permutation(np.flatnonzero(labels == c))[:q]] = True
    return images[~is_val], labels[~is_val], images[is_val], labels[is_val]


def compute_stats(images, chunk_size=2048):
    """Per-pixel mean and standard deviation (float32, (3072,)) of uint8 images.

    Sums are exact integers accumulated chunk by chunk, so memory stays small and the
    result does not depend on the order of the images. A constant pixel gets std 1.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 2 or not len(images):
        raise ValueError(f"expected a non-empty uint8 (N, D) array, got {images.dtype} "
                         f"{images.shape}")
    total = np.zeros(images.shape[1], np.int64)
    squares = np.zeros(images.shape[1], np.int64)
    for start in range(0, len(images), chunk_size):
        block = images[start:start + chunk_size]
        total += block.sum(axis=0, dtype=np.int64)
        squares += np.square(block, dtype=np.uint16).sum(axis=0, dtype=np.int64)  # 255**2 fits
    mean = total / len(images)
    std = np.sqrt(np.maximum(squares / len(images) - mean ** 2, 0.0))
    std[std == 0] = 1.0  # a pixel constant in training carries no information: leave it 0
    return mean.astype(np.float32), std.astype(np.float32)


Preprocessing = namedtuple("Preprocessing", "mean std whitening", defaults=(None,))
Preprocessing.__doc__ = """What turns uint8 images into network inputs, fixed from the training split:
x = (image - mean) / std, then x @ whitening (3072, k) when PCA whitening is on."""


WHITEN_SAMPLE = 10000  # training images the whitening's covariance is estimated from


def fit_preprocessing(images, whiten=0, eps=0.1, sample=WHITEN_SAMPLE):
    """The Preprocessing of a training split: per-pixel statistics, and with `whiten` > 0 the
    projection onto its `whiten` leading principal components, each scaled to unit variance.

    That is ZCA whitening up to a rotation, which a dense first layer with a rotation-invariant
    initialisation does not see, and it drops the smallest components, which are mostly noise.
    `eps` (a share of the mean kept eigenvalue) damps the weakest components; the covariance
    comes from the first `sample` images. Returns the Preprocessing and the FLOPs of its
    matrix products.
    """
    check_whitening(whiten, len(images), sample)
    mean, std = compute_stats(images)
    if not whiten:
        return Preprocessing(mean, std), 0
    x = normalize(images[:sample], mean, std)
    covariance = (x.T @ x).astype(np.float64) / len(x)
    values, vectors, flops = leading_eigenvectors(covariance, whiten)
    values = np.maximum(values, 0)  # rounding can make a zero eigenvalue slightly negative
    whitening = vectors / np.sqrt(values + eps * values.mean())
    return Preprocessing(mean, std, whitening.astype(np.float32)), flops + 2 * x.size * len(x.T)


def check_whitening(whiten, n_images, sample=WHITEN_SAMPLE):
    """Refuse more whitened components than the training images they are estimated from."""
    if whiten > min(n_images, sample):
        raise cli.UsageError(f"--whiten {whiten} is more than the {min(n_images, sample)} "
                             f"training images the whitening is computed from")


def leading_eigenvectors(c, k, iterations=4, oversample=64):
    """The `k` largest eigenvalues (descending) and eigenvectors of a symmetric matrix, and the
    FLOPs of the products: subspace iteration on a random block, then a small exact eigh
    (a full eigh of 3072 x 3072 takes ten times longer)."""
    d, m = len(c), min(k + oversample, len(c))
    q = np.random.default_rng(0).standard_normal((d, m))
    for _ in range(iterations + 1):
        q = np.linalg.qr(c @ q)[0]
    values, small = np.linalg.eigh(q.T @ c @ q)
    vectors = q @ small[:, ::-1][:, :k]
    flops = 2 * (iterations + 2) * d * d * m + 2 * d * m * (m + k)  # QR's own work not counted
    return values[::-1][:k], vectors, flops


def make_batch(images, idx, prep, dtype=np.float32, flips=None, shifts=None, turns=None,
               out=None):
    """Network inputs (len(idx), k) of the uint8 images at `idx`: each mirrored where `flips`,
    turned by `turns` (see `warp`), shifted by `shifts` (rows down, columns right; the
    uncovered border 0), normalised into `out` (if given, to reuse memory), then whitened if
    `prep` is.

    kernels.make_batch does the gather, the augmentation and the normalisation in one pass."""
    n = len(idx)
    flips = np.zeros(n, bool) if flips is None else flips
    shifts = np.zeros((n, 2), np.int64) if shifts is None else shifts
    turns = np.tile((1.0, 0.0), (n, 1)) if turns is None else turns
    out = np.empty((n, images.shape[1]), dtype) if out is None else out
    if kernels.enabled():
        check_batch(images, idx, flips, shifts, turns, prep, out)
        kernels.make_batch(images, idx, flips, shifts, turns, prep.mean, prep.std, out)
    else:
        normalize(warp(images[idx], flips, shifts, turns), prep.mean, prep.std, out)
    return out if prep.whitening is None else out @ prep.whitening.astype(dtype, copy=False)


def check_batch(images, idx, flips, shifts, turns, prep, out):
    """Refuse (ValueError, IndexError) what the kernel would read or write out of bounds, as
    NumPy's reference does: it does not check, and would crash or corrupt memory."""
    n, rows = len(idx), len(images)
    if (np.ndim(images) != 2 or images.shape[1] != PIXELS or out.shape != (n, PIXELS)
            or any(a.shape != (PIXELS,) for a in prep[:2]) or len(flips) != n
            or np.shape(shifts) != (n, 2) or np.shape(turns) != (n, 2)):
        raise ValueError(f"a batch of {n} images of {PIXELS} values needs arrays of its shapes")
    if n and not -rows <= np.min(idx) <= np.max(idx) < rows:
        raise IndexError(f"image indices out of range for {rows} images")


def preprocess(images, prep, dtype=np.float32, out=None, mirror=False):
    """Network inputs (N, k) of uint8 images (N, 3072), mirrored if `mirror`: a batch of all
    of them, as they are."""
    return make_batch(images, np.arange(len(images)), prep, dtype,
                      np.full(len(images), mirror), out=out)


def preprocess_flops(prep):
    """FLOPs per image of `preprocess`'s matrix product (none without whitening)."""
    return 0 if prep.whitening is None else 2 * prep.whitening.size


def normalize(images, mean, std, out=None):
    """(images - mean) / std as float32 (or in `out`'s float type), without float64 temporaries."""
    if out is None:
        out = np.empty(images.shape, np.float32)
    np.subtract(images, mean, out=out)
    np.divide(out, std, out=out)
    return out


# --- augmentation -------------------------------------------------------------------------------


def training_batch(images, labels, idx, rng, prep, config, dtype=np.float32, out=None):
    """The inputs x and labels y of the training batch of the images at `idx`, randomly
    mirrored and shifted as `config` says, and the mix (lam, y2) or None: with MixUp each input
    is lam * itself + (1 - lam) * another of the batch, labelled y2, lam ~ Beta(a, a)."""
    views = draw_augmentation(len(idx), rng, config["flip"], config["translate"],
                              config["rotate"])
    x, y = make_batch(images, idx, prep, dtype, *views, out=out), labels[idx]
    if not config["mixup"]:
        return x, y, None
    # Preprocessing is affine, so blending inputs blends the images.
    lam, other = rng.beta(config["mixup"], config["mixup"]), rng.permutation(len(idx))
    return lam * x + (1 - lam) * x[other], y, (lam, y[other])


def draw_augmentation(n, rng, flip=True, translate=0, rotate=0):
    """For n images: random flips (n,), each with probability 1/2 (if `flip`), shifts (n, 2)
    of up to `translate` pixels each way, and turns (n, 2) by angles of up to `rotate` degrees
    either way, as their (cosine, sine)."""
    flips = rng.random(n) < 0.5 if flip else np.zeros(n, bool)
    shifts = (rng.integers(-translate, translate + 1, size=(n, 2)) if translate
              else np.zeros((n, 2), np.int64))
    angles = np.radians(rng.uniform(-rotate, rotate, n)) if rotate else np.zeros(n)
    return flips, shifts, np.stack([np.cos(angles), np.sin(angles)], axis=1)


def augment(images, rng, flip=True, translate=0):
    """A uint8 copy of `images` where each image is mirrored left-right with probability 1/2
    (if `flip`) and shifted by up to `translate` pixels each way, the uncovered border zero."""
    return flip_and_shift(images, *draw_augmentation(len(images), rng, flip, translate)[:2])


def warp(images, flips, shifts, turns):
    """`images` (uint8) as float32, each mirrored where `flips`, turned about its centre by the
    angle whose (cosine, sine) `turns` holds, then shifted by `shifts`; a turned image's
    pixels are interpolated (bilinear) from its four nearest, the world outside it 0."""
    out = flip_and_shift(images, flips, shifts).astype(np.float32)
    y, x = np.mgrid[:32, :32] - 15.5  # about the centre
    for i in np.flatnonzero(turns[:, 1]):  # the turned ones, sampled where they came from
        (cos, sin), (dy, dx) = turns[i], shifts[i]
        u, v = x - dx, y - dy
        sx, sy = cos * u + sin * v + 15.5, -sin * u + cos * v + 15.5
        sx = 31 - sx if flips[i] else sx
        x0, y0 = np.floor(sx).astype(int), np.floor(sy).astype(int)
        fx, fy = sx - x0, sy - y0
        image = images[i].reshape(IMAGE_SHAPE).astype(np.float64)

        def pixel(r, c):  # (3, 32, 32): the image at rows r, columns c; 0 outside
            inside = (0 <= r) & (r < 32) & (0 <= c) & (c < 32)
            return np.where(inside, image[:, r.clip(0, 31), c.clip(0, 31)], 0.0)
        value = ((1 - fy) * ((1 - fx) * pixel(y0, x0) + fx * pixel(y0, x0 + 1))
                 + fy * ((1 - fx) * pixel(y0 + 1, x0) + fx * pixel(y0 + 1, x0 + 1)))
        out[i] = value.astype(np.float32).reshape(PIXELS)
    return out


def flip_and_shift(images, flips, shifts):
    """A uint8 copy of `images`, each mirrored left-right where `flips`, then shifted by
    `shifts` (rows down, columns right), the uncovered border zero."""
    n, size = len(images), IMAGE_SHAPE[1]
    src = np.asarray(images).reshape(n, *IMAGE_SHAPE)
    out = np.zeros_like(src)
    for i, (dy, dx) in enumerate(shifts.tolist()):  # one slice copy per image: ~2 us each
        image = src[i, :, :, ::-1] if flips[i] else src[i]
        out[i, :, max(dy, 0):size + min(dy, 0), max(dx, 0):size + min(dx, 0)] = \
            image[:, max(-dy, 0):size + min(-dy, 0), max(-dx, 0):size + min(-dx, 0)]
    return out.reshape(n, PIXELS)
