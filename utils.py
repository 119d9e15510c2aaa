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
import textwrap
import warnings

import numpy as np
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

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


def count_axis(ax, values):
    """Integer ticks on the x axis of a count (epochs, trials), and limits half a step or more
    beyond the values: a lone value gets one tick, not ticks at 0.945 ... 1.050."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1, steps=[1, 2, 5, 10]))
    if len(values):
        low, high = min(values), max(values)
        pad = max(0.5, 0.03 * (high - low))
        ax.set_xlim(low - pad, high + pad)


def plot_history(records, path):
    """Training curves: loss, accuracy and learning rate per epoch, from train.py's records.
    Each legend gives the last value, so a run of one epoch (a dot per curve) still reads."""
    fig = Figure(figsize=(15, 4.2), layout="constrained")
    axes = fig.subplots(1, 3)
    panels = [("Cross-entropy loss", [("train_loss", "train"), ("val_loss", "validation, one view")]),
              ("Accuracy", [("train_acc", "train"), ("val_acc", "validation, one view")]),
              ("Learning rate", [("lr", None)])]
    for ax, (title, series) in zip(axes, panels):
        for key, label in series:
            points = [(r["epoch"], r[key]) for r in records if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), marker="o" if len(points) < 30 else None,
                        markersize=3 if len(points) > 2 else 6,
                        label=label and f"{label}, last {points[-1][1]:.4f}")
        ax.set(title=title, xlabel="epoch")
        count_axis(ax, [r["epoch"] for r in records])
        ax.grid(alpha=0.3)
        if ax.has_data() and any(label for _, label in series):
            ax.legend()
    best = [(r["val_acc"], r["epoch"]) for r in records if r.get("val_acc") is not None]
    if best:
        acc, epoch = max(best)
        axes[1].axvline(epoch, color="grey", linestyle=":", linewidth=1)
        axes[1].set_title(f"Accuracy (best one-view validation {acc:.4f}, epoch {epoch})")
    save_figure(fig, path)


# What weights.png shows, by whether the network sees whitened images.
WEIGHTS_SHOWN = {
    False: "Each unit's weights over the normalised pixels, drawn as an image: the input it "
           "responds to most.",
    True: "The network sees whitened images, so each unit's weights are mapped back to pixels "
          "through the whitening's pseudo-inverse: the image the unit responds to most. (Its "
          "filter on raw pixels, whitening @ w1, looks like fine coloured noise: whitening "
          "amplifies fine detail.)",
}
WEIGHTS_NOTE = ("Part of each is still the random start, the more so after a short run. Each "
                "image is scaled to its own range.")


def input_patterns(w1, prep):
    """What each first-layer unit responds to, as images (3072, units) of pixel deviations from
    the mean image.

    A unit computes w . x of the network's input x. The input x it responds to most (at a given
    length) is w itself: without whitening that is a pattern of normalised pixels, with it a
    pattern of whitened components, which the pseudo-inverse of the whitening maps back to the
    normalised-pixel image whose whitening it is. Times the pixels' spread, either is in pixels.
    """
    if len(prep.std) != PIXELS:
        raise cli.Error(f"first-layer weights over {len(prep.std)} values per image are not "
                        f"of 32x32 RGB images (need {PIXELS})")
    w1 = np.asarray(w1, dtype=np.float64)
    if prep.whitening is not None:
        w1 = np.linalg.pinv(prep.whitening.astype(np.float64)).T @ w1
    return w1 * np.asarray(prep.std, np.float64)[:, None]


def plot_weights(w1, prep, path, n=100):
    """What the first `n` units of a first layer `w1` respond to (`input_patterns`; `prep` is
    the network's data_loader.Preprocessing) as 32x32 colour images, each scaled to [0, 1],
    under a caption that says what they are."""
    patterns = input_patterns(w1, prep)
    n = min(n, patterns.shape[1])
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(max(cols * 0.9, 6), rows * 0.9 + 1.1), layout="constrained")
    shown = f"{WEIGHTS_SHOWN[prep.whitening is not None]} {WEIGHTS_NOTE}"
    fig.suptitle(f"What the first layer responds to: {n} of {patterns.shape[1]} hidden units\n"
                 + textwrap.fill(shown, 110), fontsize="medium")
    for j, ax in enumerate(fig.subplots(rows, cols, squeeze=False).flat):
        ax.set_axis_off()
        if j < n:
            image = patterns[:, j].reshape(IMAGE_SHAPE).transpose(1, 2, 0)
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


def fmt(value):
    """A parameter value, short (4 significant digits) and safe to print."""
    return f"{value:.4g}" if isinstance(value, float) else cli.shown(value)


def plot_search(study, out_dir, space, names):
    """A search's pictures in `out_dir`, named by `names` (search_report.FILES), drawn like every
    other figure here: each complete trial's validation accuracy and the best so far; the
    importances of the searched parameters by PED-ANOVA (named here: Optuna 4's default,
    fANOVA, needs scikit-learn), when two or more vary (one alone is 1 by definition); and
    validation accuracy against the two most important that varied, in val_acc_<a>_<b>.png.
    Plots of an earlier state that no longer apply are removed. Returns the name of that last
    plot and why there are no importances."""
    import optuna

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    plot_trials(complete, os.path.join(out_dir, names["history"]))
    varied = [k for k in space if len({str(t.params.get(k)) for t in complete}) > 1]
    importances, why_not = {}, None
    if len(varied) < 2:
        why_not = (f"only {varied[0]} varies, and one parameter alone has importance 1"
                   if varied else "no parameter varies among the complete trials")
    else:
        try:
            importances = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.PedAnovaImportanceEvaluator())
        except Exception as exc:  # too few complete trials
            why_not = f"{type(exc).__name__}: {exc}"
    shown = sorted(varied, key=lambda k: -importances.get(k, 0))[:2]
    pair = f"val_acc_{'_'.join(shown)}.png" if shown else None
    keep = {pair, names["importance"] if importances else None}
    for old in os.listdir(out_dir):
        if (re.fullmatch(r"val_acc_.*\.png", old) or old == names["importance"]) and \
                old not in keep:
            os.remove(os.path.join(out_dir, old))
    if importances:
        plot_importances(importances, os.path.join(out_dir, names["importance"]))
    if shown:
        plot_slices(complete, shown, space, os.path.join(out_dir, pair))
    return pair, why_not


def plot_trials(trials, path):
    """Each complete trial's validation accuracy by trial number, and the best so far."""
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.subplots()
    numbers, values = [t.number for t in trials], [t.value for t in trials]
    title = "Search: no trial has completed yet"
    if trials:
        ax.plot(numbers, values, "o", label="a complete trial")
        ax.step(numbers, np.maximum.accumulate(values), where="post", label="best so far")
        best = int(np.argmax(values))  # of equals, the earlier, as the report ranks them
        title = (f"Search: validation accuracy of each trial (best {values[best]:.4f}, "
                 f"trial {numbers[best]})")
        ax.legend()
    ax.set(title=title, xlabel="trial", ylabel="validation accuracy")
    count_axis(ax, numbers)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def plot_importances(importances, path):
    """Horizontal bars of the searched parameters' importances (they sum to 1), largest on top."""
    keys = list(importances)[::-1]
    fig = Figure(figsize=(7, 1.4 + 0.45 * len(keys)), layout="constrained")
    ax = fig.subplots()
    bars = ax.barh(keys, [importances[k] for k in keys])
    ax.bar_label(bars, fmt="%.2f", padding=3)
    ax.set(xlim=(0, 1.1), title="Search: how much each parameter moves the validation accuracy",
           xlabel="importance (PED-ANOVA; they sum to 1)")
    ax.grid(axis="x", alpha=0.3)
    save_figure(fig, path)


def plot_slices(trials, keys, space, path):
    """Validation accuracy against each searched parameter in `keys`, a panel each; every
    complete trial is a dot coloured by its number. Lists of values are evenly spaced in the
    order given; ranges are numeric axes (logarithmic for :log, whole numbers for ints)."""
    fig = Figure(figsize=(1.5 + 4.5 * len(keys), 4.4), layout="constrained")
    axes = fig.subplots(1, len(keys), sharey=True, squeeze=False)[0]
    numbers = [t.number for t in trials]
    colours = Normalize(min(numbers), max(max(numbers), min(numbers) + 1))
    for ax, key in zip(axes, keys):
        choices = space[key].get("choices")
        x = [choices.index(t.params[key]) if choices else t.params[key] for t in trials]
        dots = ax.scatter(x, [t.value for t in trials], c=numbers, cmap="viridis", norm=colours,
                          edgecolors="black", linewidths=0.5, zorder=2)
        if choices:
            ax.set_xticks(range(len(choices)), [fmt(c) for c in choices])
            ax.set_xlim(-0.5, len(choices) - 0.5)
        elif space[key]["log"]:  # ticks written as numbers, at 1, 2 and 5 in a short range
            ax.set_xscale("log")
            short = space[key]["high"] <= 30 * space[key]["low"]
            ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5) if short else (1,)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        elif space[key]["int"]:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(xlabel=key)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation accuracy")
    bar = fig.colorbar(dots, ax=list(axes), label="trial")
    bar.ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"Search: validation accuracy against {' and '.join(keys)} "
                 "(a dot per complete trial)")
    save_figure(fig, path)


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

    draw(plot_weights, WEIGHTS_PNG, net.w1, meta["prep"])
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
