"""Pictures and metrics of a trained network, shared by train.py, test.py and the search.

Figures are drawn on `matplotlib.figure.Figure` objects, never through pyplot, so no
window opens, no backend or display is needed and nothing is left in global state.
Each PNG is written atomically under a fixed name.

`python utils.py --model results/best.npy` redraws every picture for a saved model.
"""
import json
import math
import os
import re
import warnings

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

import checkpoint
import cli
import data_loader
import files
import limits
from inference import predict_proba

from data_loader import IMAGE_SHAPE, PIXELS

# The names every script uses, so that the pictures of a run are easy to find.
CURVES_PNG = "curves.png"
WEIGHTS_PNG = "weights.png"
CONFUSION_PNG = "confusion_matrix.png"
MISCLASSIFIED_PNG = "misclassified.png"


# --- metrics ----------------------------------------------------------------------------------


def confusion_matrix(labels, predictions, n_classes):
    """Counts of (true class, predicted class) pairs: rows are true, columns predicted."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    if labels.shape != predictions.shape:
        raise ValueError(f"{labels.shape} labels but {predictions.shape} predictions")
    for name, a in (("labels", labels), ("predictions", predictions)):
        if a.size and (a.min() < 0 or a.max() >= n_classes):
            raise ValueError(f"{name} must lie in [0, {n_classes}), got {a.min()}..{a.max()}")
    pairs = labels.astype(np.int64) * n_classes + predictions.astype(np.int64)
    return np.bincount(pairs, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def class_metrics(counts):
    """Per-class accuracy (the share of the class's images labelled correctly, i.e. recall),
    precision and support from a confusion matrix.

    A ratio whose denominator is zero (a class never predicted, or absent) is 0.
    """
    counts = np.asarray(counts, dtype=np.int64)
    tp = np.diag(counts)
    predicted, support = counts.sum(axis=0), counts.sum(axis=1)
    ratio = lambda a, b: np.divide(a, b, out=np.zeros(len(a)), where=b > 0)
    return {"accuracy": ratio(tp, support), "precision": ratio(tp, predicted), "support": support}


# --- figures ----------------------------------------------------------------------------------


def save_figure(fig, path, dpi=100):
    """Write `fig` to `path` as a PNG, atomically; warnings (a glyph missing from the font)
    are not printed."""
    with files.atomic_write(path) as f, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight")


def label(text):
    """Text from a file (a class name) as a figure shows it: literally, never as $math$, and
    escaped as for the terminal, where matplotlib's errors would quote it."""
    return cli.shown(text).replace("$", r"\$")


def plot_history(records, path):
    """Training curves: loss, accuracy and learning rate per epoch, from train.py's records."""
    fig = Figure(figsize=(15, 4.2), layout="constrained")
    axes = fig.subplots(1, 3)
    panels = [("Cross-entropy loss", [("train_loss", "train"), ("val_loss", "validation")]),
              ("Accuracy", [("train_acc", "train"), ("val_acc", "validation")]),
              ("Learning rate", [("lr", None)])]
    for ax, (title, series) in zip(axes, panels):
        for key, label in series:
            points = [(r["epoch"], r[key]) for r in records if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), marker="o" if len(points) < 30 else None,
                        markersize=3, label=label)
        ax.set(title=title, xlabel="epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.has_data() and any(label for _, label in series):
            ax.legend()
    best = [(r["val_acc"], r["epoch"]) for r in records if r.get("val_acc") is not None]
    if best:
        acc, epoch = max(best)
        axes[1].axvline(epoch, color="grey", linestyle=":", linewidth=1)
        axes[1].set_title(f"Accuracy (best validation {acc:.4f} at epoch {epoch})")
    save_figure(fig, path)


def plot_weights(w1, path, n=100):
    """The first `n` first-layer weight vectors as 32x32 colour images, each scaled to [0, 1]."""
    w1 = np.asarray(w1, dtype=np.float64)
    if w1.ndim != 2 or w1.shape[0] != PIXELS:
        raise cli.Error(f"first-layer weights of shape {w1.shape} are not 32x32 RGB images "
                        f"(need {PIXELS} rows)")
    n = min(n, w1.shape[1])
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(cols * 0.9, rows * 0.9 + 0.6), layout="constrained")
    fig.suptitle(f"First-layer weights: {n} of {w1.shape[1]} hidden units")
    for j, ax in enumerate(fig.subplots(rows, cols, squeeze=False).flat):
        ax.set_axis_off()
        if j < n:
            image = w1[:, j].reshape(IMAGE_SHAPE).transpose(1, 2, 0)
            low, high = image.min(), image.max()
            ax.imshow((image - low) / (high - low) if high > low else np.zeros_like(image),
                      interpolation="nearest")
    save_figure(fig, path)


def plot_confusion(counts, class_names, path):
    """Confusion matrix with the count in every cell; rows are true classes."""
    counts = np.asarray(counts)
    c = len(class_names)
    fig = Figure(figsize=(1.0 + 0.75 * c, 0.6 + 0.7 * c), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(counts, cmap="Blues")
    fig.colorbar(image, ax=ax, shrink=0.8, label="images")
    ax.set(xticks=range(c), yticks=range(c), xlabel="predicted class", ylabel="true class")
    names = [label(name) for name in class_names]
    ax.set_xticklabels(names, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticklabels(names)
    n = counts.sum()
    ax.set_title(f"Confusion matrix: {np.trace(counts)} of {n} correct "
                 f"(accuracy {np.trace(counts) / max(n, 1):.4f})")
    threshold = counts.max() / 2
    fontsize = 9 if counts.max() < 10000 else 7
    for (i, j), value in np.ndenumerate(counts):
        ax.text(j, i, str(value), ha="center", va="center", fontsize=fontsize,
                color="white" if value > threshold else "black")
    save_figure(fig, path)


def plot_misclassified(images, labels, predictions, class_names, path, n=32):
    """The first `n` misclassified images (uint8, CIFAR layout) with true and predicted labels."""
    wrong = np.flatnonzero(np.asarray(labels) != np.asarray(predictions))[:n]
    cols = 8
    rows = max(1, math.ceil(len(wrong) / cols))
    fig = Figure(figsize=(cols * 1.5, rows * 1.85 + 0.5), layout="constrained")
    fig.suptitle(f"The first {len(wrong)} misclassified images, in test-set order")
    for k, ax in enumerate(fig.subplots(rows, cols, squeeze=False).flat):
        ax.set_axis_off()
        if k < len(wrong):
            i = wrong[k]
            ax.imshow(np.asarray(images[i]).reshape(IMAGE_SHAPE).transpose(1, 2, 0),
                      interpolation="nearest")
            ax.set_title(f"true: {label(class_names[labels[i]])}\n"
                         f"pred: {label(class_names[predictions[i]])}", fontsize=9, linespacing=1.3)
    if not len(wrong):
        fig.text(0.5, 0.5, "no misclassified images", ha="center", va="center")
    save_figure(fig, path)


def plot_search(study, out_dir, space, names):
    """A search's pictures in `out_dir`, named by `names` (hyperparam_tuning.FILES): the
    optimization history (trials numbered as integers), parameter importances by PED-ANOVA
    (named here: Optuna 4's default, fANOVA, needs scikit-learn), and validation accuracy
    against the two most important searched parameters that varied, in val_acc_<a>_<b>.png
    (older such plots removed). Optuna's style stays in an rc_context. Returns the name of
    that last plot and why there are no importances."""
    import matplotlib
    matplotlib.use("agg")
    import matplotlib.pyplot as plt
    import optuna
    import optuna.visualization.matplotlib as plots

    def save(axes, name):  # Axes, or an array of them
        figure = np.ravel(axes)[0].figure
        try:
            save_figure(figure, os.path.join(out_dir, name))
        finally:
            plt.close(figure)

    target, evaluator = "validation accuracy", optuna.importance.PedAnovaImportanceEvaluator()
    with matplotlib.rc_context({"text.parse_math": False}), warnings.catch_warnings():
        # The study's values come from its journal: shown as they are, never as $math$.
        warnings.simplefilter("ignore")  # Optuna's matplotlib plots are "experimental"
        history = plots.plot_optimization_history(study, target_name=target)
        history.xaxis.set_major_locator(MaxNLocator(integer=True))
        save(history, names["history"])
        try:
            importances = optuna.importance.get_param_importances(study, evaluator=evaluator)
            why_not = None if importances else "no parameter varies among the complete trials"
        except Exception as exc:  # too few complete trials
            importances, why_not = {}, f"{type(exc).__name__}: {cli.one_line(exc)}"
        if importances:
            save(plots.plot_param_importances(study, evaluator=evaluator, target_name=target),
                 names["importance"])
        complete = study.get_trials(deepcopy=False,
                                    states=(optuna.trial.TrialState.COMPLETE,))
        varied = [k for k in space if len({str(t.params.get(k)) for t in complete}) > 1]
        shown = sorted(varied, key=lambda k: -importances.get(k, 0))[:2]
        pair = f"val_acc_{'_'.join(shown)}.png" if shown else None
        for old in os.listdir(out_dir):
            if re.fullmatch(r"val_acc_.*\.png", old) and old != pair:
                os.remove(os.path.join(out_dir, old))
        if shown:
            save(plots.plot_slice(study, params=shown, target_name=target), pair)
    return pair, why_not


# --- command line -----------------------------------------------------------------------------


def _is_record(record):
    """Whether `record` is an epoch record that plot_history can draw."""
    return (isinstance(record, dict) and type(record.get("epoch")) is int
            and 0 < record["epoch"] <= 10**6
            and all(record.get(key) is None or checkpoint.finite(record[key])
                    for key in ("train_loss", "val_loss", "train_acc", "val_acc", "lr")))


def load_history(path):
    """The epoch records (a list of dicts) of a history.json written by train.py."""
    try:
        with files.open_regular(path, limits.HISTORY_BYTES) as f:
            records = json.load(f)["epochs"]
        if not (isinstance(records, list) and all(map(_is_record, records))):
            raise ValueError("'epochs' is not a list of records of finite numbers, numbered "
                             "from 1")
        return records
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise cli.Error(f"cannot read training history {cli.shown(path)}: "
                        f"{cli.shown(reason)}") from None


def load_test_set(data_dir, net, meta, model_path):
    """The CIFAR-10 test images and labels, refused if they do not fit the network."""
    _, _, images, labels = data_loader.load_data(data_dir)
    if images.shape[1] != len(meta["mean"]):
        raise cli.Error(f"{cli.shown(model_path)} takes {len(meta['mean'])} inputs per image but "
                        f"the images in {cli.shown(data_dir)} have {images.shape[1]}")
    if net.output_size != data_loader.N_CLASSES:  # else a confusion matrix of classes squared
        raise cli.Error(f"{cli.shown(model_path)} has {net.output_size} classes, not the "
                        f"{data_loader.N_CLASSES} of CIFAR-10")
    return images, labels


def add_model_options(parser, model_help):
    """--model, --data-dir and --batch-size: what test.py and utils.py both take."""
    parser.add_argument("--model", default="results/best.npy",
                        help=model_help)
    parser.add_argument("--data-dir", default="data",
                        help="folder holding CIFAR-10")
    parser.add_argument("--batch-size", type=int, default=2000,
                        help="test images per forward pass")


def parse_model_options(parser, argv):
    args = parser.parse_args(argv)
    if args.batch_size <= 0:
        parser.error("--batch-size must be positive")
    return args


def main(argv=None):
    parser = cli.Parser(prog="utils.py",
                        description="Redraw the pictures of a saved model: weights, training "
                        "curves (from history.json beside the model), confusion matrix and "
                        "misclassified test images.")
    add_model_options(parser, "checkpoint to draw")
    parser.add_argument("--out-dir", help="folder for the pictures (default: the checkpoint's)")
    args = parse_model_options(parser, argv)

    net, meta = checkpoint.load_checkpoint(args.model)
    out_dir = args.out_dir or os.path.dirname(os.path.abspath(args.model))
    files.writable_folder(out_dir)

    def draw(plot, name, *plot_args):
        plot(*plot_args, os.path.join(out_dir, name))
        print(f"wrote {cli.shown(os.path.join(out_dir, name))}")

    whitening = meta["prep"].whitening  # first-layer weights as seen from the pixels
    draw(plot_weights, WEIGHTS_PNG, net.w1 if whitening is None else  # float64: no overflow
         whitening.astype(np.float64) @ net.w1)
    history = os.path.join(os.path.dirname(os.path.abspath(args.model)), "history.json")
    if os.path.exists(history):
        draw(plot_history, CURVES_PNG, load_history(history))
    else:
        print(f"no {cli.shown(history)}: skipping the training curves")
    images, labels = load_test_set(args.data_dir, net, meta, args.model)
    predictions = predict_proba(net, meta, images, args.batch_size).argmax(1)
    counts = confusion_matrix(labels, predictions, net.output_size)
    draw(plot_confusion, CONFUSION_PNG, counts, meta["class_names"])
    draw(plot_misclassified, MISCLASSIFIED_PNG, images, labels, predictions, meta["class_names"])
    return 0


if __name__ == "__main__":
    cli.run(main)
