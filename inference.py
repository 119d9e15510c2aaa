"""The network applied to uint8 images, preprocessed as in training and averaged over views.

Where the data and the model meet outside the training step: validation in train.py, the
test set and your own pictures in test.py, the pictures in utils.py.
"""
import numpy as np

import cli
import data_loader
import model


def views(flip_average=False, shift=0):
    """The test-time views a prediction averages, as (mirrored, rows down, columns right): the
    image, with `flip_average` its mirror image too, and with `shift` each of those shifted
    by that many pixels up, down, left and right."""
    offsets = [(0, 0)] + ([(shift, 0), (-shift, 0), (0, shift), (0, -shift)] if shift else [])
    return [(mirror, dy, dx) for mirror in (False, True)[:1 + bool(flip_average)]
            for dy, dx in offsets]


def log_probabilities(net, images, prep, views=views(), batch_size=2000):
    """Log-probabilities (N, C) of uint8 images (N, 3072), preprocessed by `prep` (a
    data_loader.Preprocessing) a batch at a time so that memory stays small, each image's
    probabilities averaged over its `views` (see `views`)."""
    out = np.empty((len(images), net.output_size), net.dtype)
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        idx, n = np.arange(len(chunk)), len(chunk)
        per_view = [net.forward_pass(data_loader.make_batch(
            chunk, idx, prep, net.dtype, np.full(n, mirror), np.tile((dy, dx), (n, 1))))[0]
            for mirror, dy, dx in views]
        out[start:start + n] = np.logaddexp.reduce(per_view) - np.log(len(views), dtype=net.dtype)
    return out


def evaluate(net, images, labels, prep, views=views()):
    """Mean cross-entropy and accuracy on uint8 images (no dropout, no smoothing)."""
    log_probs = log_probabilities(net, images, prep, views)
    return model.cross_entropy(log_probs, labels), float(np.mean(log_probs.argmax(1) == labels))


def evaluate_flops(net, prep, n_images, views=views()):
    """FLOPs of `evaluate` on `n_images` images."""
    return n_images * (net.flops() + data_loader.preprocess_flops(prep)) * len(views)


def meta_views(meta):
    """The test-time views a checkpoint's `meta` asks for."""
    return views(meta.get("flip_average", False), meta.get("test_shift", 0))


def predict_proba(net, meta, images, batch_size=2000):
    """Class probabilities of uint8 images, preprocessed as the checkpoint's `meta` says.

    Refuses outputs that are not finite (a checkpoint with extreme weights or statistics)."""
    with np.errstate(all="ignore"):  # overflow is reported below, in one line
        probs = np.exp(log_probabilities(net, images, meta["prep"], meta_views(meta),
                                         batch_size))
    if not np.isfinite(probs).all():
        raise cli.Error("the model's outputs are not finite (NaN or infinity): its weights or "
                        "normalisation statistics are too extreme for "
                        f"{np.dtype(net.dtype).name} arithmetic")
    return probs
