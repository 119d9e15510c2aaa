"""Evaluate a saved model on the CIFAR-10 test set, or classify your own pictures.

    python test.py --model results/best.npy               # accuracy, table, plots, JSON
    python test.py --model results/best.npy --image a.jpg  # top three classes per picture

The checkpoint carries everything needed: architecture, activation, normalisation
and class names.
"""
import contextlib
import os
import sys
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

import checkpoint
import cli
import files
import limits
import utils
from inference import predict_proba

METRICS_JSON = "test_metrics.json"


# Raster formats only: Pillow would hand EPS and PS files to Ghostscript.
FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP")
WORKING_SIDE = 128  # a bigger picture is shrunk to about this short side, in bands
BAND_PIXELS = 1 << 20  # converted at a time while shrinking


def load_image(path):
    """A picture file as one CIFAR-layout uint8 vector (R, G, B planes of 32x32).

    The picture is centre-cropped to a square, then resized, so shapes are not
    squashed; transparent areas become white. Only regular files in FORMATS are read.
    """
    try:
        with warnings.catch_warnings(), _quiet_stderr():
            # Past PIL's pixel limit an image is refused, not decoded after a warning.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = _open_image(path)
    except UnidentifiedImageError:
        raise cli.Error(f"cannot read image {cli.shown(path)}: not a picture in one of the "
                        f"formats {', '.join(FORMATS)}") from None
    except Exception as exc:  # a decoder's failure on a damaged or crafted file, of any kind
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        kind = "" if isinstance(exc, (OSError, ValueError)) else f"{type(exc).__name__}: "
        raise cli.Error(f"cannot read image {cli.shown(path)}: {kind}{cli.shown(reason)}") \
            from None
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).reshape(-1)


@contextlib.contextmanager
def _quiet_stderr():
    """Keep what C libraries print while decoding (libtiff's warnings) off stderr: the error
    line, if any, says what matters."""
    with contextlib.suppress(AttributeError, OSError):  # no stderr at all: nothing to keep
        sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def _open_image(path):
    """The picture at `path` as a 32x32 RGB image (see `load_image`).

    A big picture is shrunk to about WORKING_SIDE pixels (JPEG while it is decoded), a band
    of rows at a time, so memory stays near one decoded copy of at most limits.IMAGE_PIXELS
    pixels, whatever its mode.
    """
    with files.open_regular(path) as f, Image.open(f, formats=FORMATS) as img:
        check_size(img)
        img.draft(img.mode, (WORKING_SIDE, WORKING_SIDE))  # JPEG: decode at 1/2 to 1/8
        exif = img.getexif().tobytes()
        small = shrink(img, min(img.size) // WORKING_SIDE)
    small.info["exif"] = exif
    ImageOps.exif_transpose(small, in_place=True)  # phone photos store their rotation in EXIF
    return ImageOps.fit(small, utils.IMAGE_SHAPE[1:], Image.Resampling.LANCZOS)


def check_size(img):
    """Refuse, before it is decoded, a picture of more than limits.IMAGE_PIXELS pixels or whose
    tiles (what a decoder allocates at once) are larger than the picture and TILE_SIDE."""
    if img.width * img.height > limits.IMAGE_PIXELS:
        raise ValueError(f"{img.width}x{img.height} pixels, more than the "
                         f"{limits.IMAGE_PIXELS} this reads")
    tags = getattr(img, "tag_v2", {})  # a TIFF's tile width and length
    tiles = [(tags.get(322, 0), tags.get(323, 0))] + [
        (x1 - x0, y1 - y0) for _, (x0, y0, x1, y1), *_ in img.tile]
    for width, height in tiles:
        if not (width <= max(img.width, limits.TILE_SIDE)
                and height <= max(img.height, limits.TILE_SIDE)):
            raise ValueError(f"tiles of {width}x{height} pixels in a picture of "
                             f"{img.width}x{img.height}")


def shrink(img, factor):
    """`img` as 8-bit RGB (see `to_rgb`), `factor` times smaller (box averages) if `factor` is
    2 or more: converted a band of rows at a time, so that no full-size copy is made."""
    if factor < 2:
        return to_rgb(img)
    width, height = img.width // factor, img.height // factor
    rows = factor * max(1, BAND_PIXELS // (img.width * factor))
    small = Image.new("RGB", (width, height))
    for top in range(0, height * factor, rows):
        band = img.crop((0, top, width * factor, min(top + rows, height * factor)))
        small.paste(to_rgb(band).reduce(factor), (0, top // factor))
    return small


def to_rgb(img):
    """`img`, of any mode, as 8-bit RGB; transparent areas become white.

    Integer greys of 16 bits (I;16...) and 32 bits (I, as Pillow opens most 16-bit files)
    are divided by 257, so 65535 is white; float greys (F) are taken to lie in [0, 1] and
    multiplied by 255. Values outside the range are clipped, NaN becomes black, and the
    transparency of such greys is ignored.
    """
    if img.mode == "F" or img.mode.startswith("I"):
        grey = np.array(img, dtype=np.float32)  # a copy, then scaled in place
        with np.errstate(all="ignore"):  # values past float32 become inf, then 255
            grey *= np.float32(255 if img.mode == "F" else 1 / 257)
        np.clip(np.nan_to_num(np.rint(grey, out=grey), copy=False), 0, 255, out=grey)
        return Image.fromarray(grey.astype(np.uint8), "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    return img.convert("RGB")


def classify_images(net, meta, paths, top=3):
    """Print the `top` most likely classes of each picture that can be read, with their
    probabilities, then an error line for each that cannot; returns the exit status (1 if
    any could not be read), so that one bad file in a list costs only its own line."""
    read, errors = [], []
    for path in paths:
        try:
            read.append((path, load_image(path)))
        except cli.Error as exc:
            errors.append(cli.one_line(exc))
    if read:
        probs = predict_proba(net, meta, np.stack([image for _, image in read]))
        names = [cli.shown(name) for name in meta["class_names"]]
        for (path, _), p in zip(read, probs):
            best = np.argsort(p)[::-1][:top]
            print(f"{cli.shown(path)}: " + ", ".join(f"{names[k]} {p[k]:.3f}" for k in best))
    sys.stdout.flush()  # the results, then the errors, also when both go to one terminal
    for message in errors:
        sys.stderr.write(f"error: {message}\n")
    return 1 if errors else 0


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
    """The per-class figures as an aligned text table (class names escaped for the terminal)."""
    names = {name: cli.shown(name) for name in metrics["per_class"]}
    width = max(len("class"), *(len(name) for name in names.values()))
    lines = [f"{'class':<{width}}  accuracy  precision  support"]
    for name, m in metrics["per_class"].items():
        lines.append(f"{names[name]:<{width}}  {m['accuracy']:8.4f}  {m['precision']:9.4f}  "
                     f"{m['support']:7d}")
    lines.append("(accuracy: the share of the class's images labelled correctly, i.e. recall; "
                 "precision: the share of the images labelled as the class that belong to it)")
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

    net, meta = checkpoint.load_checkpoint(args.model)
    if args.image:
        if len(meta["mean"]) != utils.PIXELS:
            raise cli.Error(f"{cli.shown(args.model)} takes {len(meta['mean'])} inputs per "
                            f"image, not {utils.PIXELS} (32x32 RGB)")
        return classify_images(net, meta, args.image)

    images, labels = utils.load_test_set(args.data_dir, net, meta, args.model)
    files.writable_folder(args.out_dir)
    probs = predict_proba(net, meta, images, args.batch_size)
    predictions = probs.argmax(axis=1)
    metrics = {"model": args.model, **evaluation_metrics(labels, predictions, meta["class_names"])}
    print(f"Test accuracy: {metrics['accuracy']:.4f}")
    print(format_table(metrics))

    paths = [os.path.join(args.out_dir, name) for name in
             (METRICS_JSON, utils.CONFUSION_PNG, utils.MISCLASSIFIED_PNG)]
    files.write_json(paths[0], metrics)  # first: the figures cannot lose it
    utils.plot_confusion(metrics["confusion"], meta["class_names"], paths[1])
    utils.plot_misclassified(images, labels, predictions, meta["class_names"], paths[2])
    print("wrote " + ", ".join(map(cli.shown, paths)))
    return 0


if __name__ == "__main__":
    cli.run(main)
