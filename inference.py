"""The network applied to uint8 images, preprocessed as in training and averaged over views.

Where the data and the model meet outside the training step: validation in train.py, the
test set and your own pictures in test.py, the pictures in utils.py.
"""
import numpy as np

import cli
import data_loader
import model


def log_probabilities(net, images, prep, flip_average=False, batch_size=2000):
    """Log-probabilities (N, C) of uint8 images (N, 3072), preprocessed by `prep` (a
    data_loader.Preprocessing) a batch at a time so that memory stays small. With
    `flip_average` each image's probabilities are averaged with its mirror image's."""
    def log_probs(chunk, mirror=False):
        return net.forward_pass(data_loader.preprocess(chunk, prep, net.dtype, mirror=mirror))[0]

    out = np.empty((len(images), net.output_size), net.dtype)
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        views = log_probs(chunk)
        if flip_average:
            views = np.logaddexp(views, log_probs(chunk, mirror=True)) - np.log(2, dtype=net.dtype)
        out[start:start + len(chunk)] = views
    return out


def evaluate(net, images, labels, prep, flip_average=False):
    """Mean cross-entropy and accuracy on uint8 images (no dropout, no smoothing)."""
    log_probs = log_probabilities(net, images, prep, flip_average)
    return model.cross_entropy(log_probs, labels), float(np.mean(log_probs.argmax(1) == labels))


def evaluate_flops(net, prep, n_images, flip_average=False):
    """FLOPs of `evaluate` on `n_images` images."""
    per_image = net.flops() + data_loader.preprocess_flops(prep)
    return n_images * per_image * (2 if flip_average else 1)


def predict_proba(net, meta, images, batch_size=2000):
    """Class probabilities of uint8 images, preprocessed as the checkpoint's `meta` says.

    Refuses outputs that are not finite (a checkpoint with extreme weights or statistics)."""
    with np.errstate(all="ignore"):  # overflow is reported below, in one line
        probs = np.exp(log_probabilities(net, images, meta["prep"], meta.get("flip_average"),
                                         batch_size))
    if not np.isfinite(probs).all():
        raise cli.Error("the model's outputs are not finite (NaN or infinity): its weights or "
                        "normalisation statistics are too extreme for "
                        f"{np.dtype(net.dtype).name} arithmetic")
    return probs
