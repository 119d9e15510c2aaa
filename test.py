"""Evaluate a saved model on the CIFAR-10 test set, or classify your own pictures.

    python test.py --model results/best.npy               # accuracy, table, plots, JSON
    python test.py --model results/best.npy --image a.jpg  # top three classes per picture

The checkpoint carries everything needed: architecture, activation, normalisation
and class names.
"""
import os
import warnings

import numpy as np
from PIL import Image, ImageOps

import cli
import model
import utils

METRICS_JSON = "test_metrics.json"


def load_image(path):
    """A picture file as one CIFAR-layout uint8 vector (R, G, B planes of 32x32).

    The picture is centre-cropped to a square, then resized, so shapes are not
    squashed; transparent areas become white.
    """
    try:
        with warnings.catch_warnings():
            # Past PIL's pixel limit an image is refused, not decoded after a warning.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = _open_image(path)
    except (OSError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        # UnidentifiedImageError and truncated files are OSErrors too.
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise cli.Error(f"cannot read image {path}: {reason}") from None
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).reshape(-1)


def _open_image(path):
    """The picture at `path` as a 32x32 RGB image (see `load_image`)."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)  # phone photos store their rotation in EXIF
        if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
            rgba = img.convert("RGBA")
            img = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
        return ImageOps.fit(img.convert("RGB"), utils.IMAGE_SHAPE[1:], Image.Resampling.LANCZOS)


def classify_images(net, meta, paths, top=3):
    """Print the `top` most likely classes of each picture with their probabilities."""
    images = np.stack([load_image(path) for path in paths])
    probs = utils.predict_proba(net, meta, images)
    for path, p in zip(paths, probs):
        best = np.argsort(p)[::-1][:top]
        print(f"{path}: " + ", ".join(f"{meta['class_names'][k]} {p[k]:.3f}" for k in best))


def evaluation_metrics(labels, predictions, class_names):
    """Overall accuracy, per-class figures and confusion counts, ready for JSON."""
    counts = utils.confusion_matrix(labels, predictions, len(class_names))
    per_class = utils.class_metrics(counts)
    n = int(counts.sum())
    return {"accuracy": float(np.trace(counts) / n) if n else 0.0, "n": n,
            "class_names": list(class_names),
            "per_class": {name: {key: per_class[key][k].item() for key in per_class}
                          for k, name in enumerate(class_names)},
            "confusion": counts.tolist()}


def format_table(metrics):
    """The per-class figures as an aligned text table."""
    width = max(len("class"), *(len(name) for name in metrics["per_class"]))
    lines = [f"{'class':<{width}}  accuracy  precision  recall  support"]
    for name, m in metrics["per_class"].items():
        lines.append(f"{name:<{width}}  {m['accuracy']:8.4f}  {m['precision']:9.4f}  "
                     f"{m['recall']:6.4f}  {m['support']:7d}")
    lines.append("(accuracy is one-vs-rest: (TP+TN)/N; recall is the share of the class's "
                 "images labelled correctly)")
    return "\n".join(lines)


def main(argv=None):
    parser = cli.Parser(prog="test.py",
                        description="Evaluate a saved model on the CIFAR-10 test set, or "
                        "classify your own pictures with --image.")
    utils.add_model_options(parser, "checkpoint to evaluate")
    parser.add_argument("--out-dir", default="results", help="folder for the confusion matrix, "
                        "misclassified images and metrics JSON")
    parser.add_argument("--image", nargs="+", metavar="PATH", help="classify these pictures "
                        "instead (PNG, JPEG, ...; any size): top three classes each")
    args = utils.parse_model_options(parser, argv)

    net, meta = model.load_checkpoint(args.model)
    if args.image:
        if len(meta["mean"]) != utils.PIXELS:
            raise cli.Error(f"{args.model} takes {len(meta['mean'])} inputs per image, not "
                            f"{utils.PIXELS} (32x32 RGB)")
        classify_images(net, meta, args.image)
        return 0

    images, labels = utils.load_test_set(args.data_dir, net, meta, args.model)
    cli.writable_folder(args.out_dir)
    probs = utils.predict_proba(net, meta, images, args.batch_size)
    predictions = probs.argmax(axis=1)
    metrics = {"model": args.model, **evaluation_metrics(labels, predictions, meta["class_names"])}
    print(f"Test accuracy: {metrics['accuracy']:.4f}")
    print(format_table(metrics))

    paths = [os.path.join(args.out_dir, name) for name in
             (utils.CONFUSION_PNG, utils.MISCLASSIFIED_PNG, METRICS_JSON)]
    utils.plot_confusion(metrics["confusion"], meta["class_names"], paths[0])
    utils.plot_misclassified(images, labels, predictions, meta["class_names"], paths[1])
    cli.write_json(paths[2], metrics)
    print("wrote " + ", ".join(paths))
    return 0


if __name__ == "__main__":
    cli.run(main)
