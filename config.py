"""Every training option, declared once: its default, help, choices and valid range.

`DEFAULT_CONFIG`, `HELP` and `CHOICES` are derived from `OPTIONS`; `train.py` turns each key
into a command-line option, so adding an option is one `Option(...)` line (plus its use).
"""
import math
from collections import namedtuple

import limits
from cli import Error

Option = namedtuple("Option", "default help choices range", defaults=(None, None))
Option.__doc__ = """A training option: `range` is an interval such as "[0, 1)" or "(0, inf)"."""

POSITIVE = "(0, inf)"
NON_NEGATIVE = "[0, inf)"
RANGE_WORDS = {POSITIVE: "positive", NON_NEGATIVE: ">= 0"}

# The default is the best recipe measured within 100 TFLOP of training compute (see the
# README's results and docs/results.md): wide ReLU layers on PCA-whitened input, Nesterov SGD
# on a one-cycle schedule, L2, label smoothing, MixUp, flips and shifts, and predictions
# averaged over ten views (the image, its mirror, each shifted two pixels four ways). The
# report's recipe (512x512, plain step decay, raw pixels) is kept as the `report` preset.
OPTIONS = {
    "hidden_size": Option([1024, 1024], "sizes of the two hidden layers: one int for both, "
                          "or two ints"),
    "activation": Option("relu", "hidden-layer activation (model.ACTIVATIONS)"),
    "epochs": Option(190, "passes over the training split", range=f"(0, {limits.EPOCHS}]"),
    "batch_size": Option(128, "images per SGD step", range=POSITIVE),
    "lr": Option(0.05, "peak learning rate", range=POSITIVE),
    "lr_schedule": Option("onecycle", "learning-rate schedule after warmup: step (multiply by "
                          "--lr-decay every --lr-step epochs), cosine, onecycle (linear down to "
                          "0), constant", ["step", "cosine", "onecycle", "constant"]),
    "lr_decay": Option(0.95, "factor of the step schedule", range="(0, 1]"),
    "lr_step": Option(1, "epochs between two steps of the step schedule", range=POSITIVE),
    "warmup_epochs": Option(2.0, "epochs of linear warmup from 0 to --lr (may be fractional)",
                            range=NON_NEGATIVE),
    "momentum": Option(0.9, "SGD momentum (0 for plain SGD)", range="[0, 1)"),
    "nesterov": Option(True, "use Nesterov momentum"),
    "reg": Option(5e-4, "L2 strength lambda: the loss adds 0.5*lambda*sum(w**2) over w1, w2, "
                  "w3 (the optimiser applies it)", range="[0, 1]"),
    "dropout": Option(0.0, "inverted-dropout probability on both hidden layers (0 = off)",
                      range="[0, 1)"),
    "label_smoothing": Option(0.1, "cross-entropy label smoothing epsilon (0 = off)",
                              range="[0, 1)"),
    "whiten": Option(384, "PCA-whiten the input: keep this many principal components of the "
                     "training split, each scaled to unit variance (ZCA up to a rotation); "
                     "0 = per-pixel standardisation only", range="[0, 3072]"),
    "whiten_eps": Option(0.1, "whitening damping, as a share of the mean kept eigenvalue",
                         range="(0, 100]"),
    "flip_average": Option(True, "predict each test image, and the chosen network's "
                           "validation images, as the average of it and its mirror image (each "
                           "epoch's validation scores one view; stored in the checkpoint)"),
    "test_shift": Option(2, "also average each test prediction, and the chosen network's "
                         "validation ones, over the image shifted by this many pixels up, down, "
                         "left and right (0 = off; stored in the checkpoint)", range="[0, 16]"),
    "flip": Option(True, "random horizontal flips of training images"),
    "rotate": Option(0.0, "random rotations of training images by up to this many degrees "
                     "either way, interpolated (0 = off)", range="[0, 45]"),
    "mixup": Option(0.2, "MixUp: train on blends lam * image + (1 - lam) * another, labelled "
                    "likewise, lam ~ Beta(a, a) for this a per batch (0 = off)", range="[0, 10]"),
    "translate": Option(3, "random shifts of training images by up to this many pixels "
                        "(0 = off)", range="[0, 16]"),
    "val_size": Option(5000, "training images held out for validation (stratified)",
                       range=POSITIVE),
    "patience": Option(0, "stop after this many epochs without a better validation accuracy "
                       "(0 = never)", range=NON_NEGATIVE),
    "seed": Option(0, "random seed: the same seed gives the same run", range=f"[0, {2**32})"),
    "dtype": Option("float32", "floating-point type of the network", ["float32", "float64"]),
    "data_dir": Option("data", "folder holding (or receiving) CIFAR-10"),
    "save_dir": Option("results", "folder for best.npy, history.json and the plots"),
}

LOCAL_KEYS = ("data_dir", "save_dir")  # may differ between a run and its resumption, or machines
DEFAULT_CONFIG = {key: option.default for key, option in OPTIONS.items()}
HELP = {key: option.help for key, option in OPTIONS.items()}
CHOICES = {key: option.choices for key, option in OPTIONS.items() if option.choices}
# The report's names for two options, accepted wherever options are given.
ALIASES = {"learning_rate": "lr", "reg_lambda": "reg"}

# Named recipes that override the defaults: `python train.py --preset NAME`.
PRESETS = {
    "default": {},
    # The report's configuration, for comparison: raw pixels, plain SGD with step decay.
    "report": {"hidden_size": [512, 512], "epochs": 100, "batch_size": 256, "lr": 0.01,
               "lr_schedule": "step", "lr_decay": 0.95, "warmup_epochs": 0.0,
               "momentum": 0.0, "nesterov": False, "reg": 1e-3, "label_smoothing": 0.0,
               "flip": False, "translate": 0, "mixup": 0.0, "whiten": 0,
               "flip_average": False, "test_shift": 0},
    # Within 2 TFLOP, in a minute or two: narrower layers on fewer whitened components for 9
    # epochs, at a higher learning rate, without MixUp (it pays only over long runs); shifts
    # of one pixel in training and in the views.
    "fast": {"hidden_size": [512, 512], "epochs": 9, "warmup_epochs": 1.0, "lr": 0.12,
             "translate": 1, "mixup": 0.0, "test_shift": 1, "whiten": 256},
    # The default's ingredients on layers twice as wide, within 400 TFLOP.
    "best": {"hidden_size": [2048, 2048], "epochs": 160},
}


# How long each preset trains on a 2-core machine, in minutes: the upper ends of runs
# measured there, some while other jobs shared it (a faster loop makes them shorter).
PRESET_MINUTES = {"default": 65, "report": 15, "fast": 2, "best": 110}


def make_config(preset="default", **overrides):
    """The default configuration, updated by a preset and then by explicit overrides."""
    if preset not in PRESETS:
        raise Error(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    overrides = {ALIASES.get(key, key): value for key, value in overrides.items()}
    config = {**DEFAULT_CONFIG, **PRESETS[preset], **overrides}
    unknown = set(config) - set(DEFAULT_CONFIG)
    if unknown:
        raise Error(f"unknown configuration keys: {', '.join(sorted(unknown))}")
    config["hidden_size"] = hidden_sizes(config["hidden_size"])
    check(config)
    return config


def in_range(value, interval):
    """Whether `value` lies in an interval written "[low, high)", "(0, inf)" and so on."""
    low, high = (float(end) for end in interval[1:-1].split(","))
    above = value >= low if interval[0] == "[" else value > low
    below = value <= high if interval[-1] == "]" else value < high
    return above and below


def check(config):
    """Refuse values that cannot work, before any work starts."""
    for key, value in config.items():
        flag, option = "--" + key.replace("_", "-"), OPTIONS[key]
        if isinstance(value, float) and not math.isfinite(value):  # inf and nan pass ranges
            raise Error(f"{flag} must be a finite number, got {value}")
        if option.choices and value not in option.choices:
            raise Error(f"{flag} must be one of {', '.join(option.choices)}, got {value!r}")
        if option.range and not in_range(value, option.range):
            raise Error(f"{flag} must be {RANGE_WORDS.get(option.range, 'in ' + option.range)}, "
                        f"got {value}")
    if len(config["hidden_size"]) != 2:  # make_config makes two of one
        raise Error(f"hidden_size must hold two sizes, got {config['hidden_size']}")
    hidden_sizes(config["hidden_size"])


def hidden_sizes(value):
    """The two hidden sizes of --hidden-size's value: one positive int for both, or two.
    A bad value is named as it was given (`0`, not the `[0, 0]` it would become)."""
    sizes = [value] if isinstance(value, int) else list(value)
    if not (len(sizes) in (1, 2) and all(isinstance(h, int) and h > 0 for h in sizes)):
        raise Error(f"--hidden-size takes one or two positive ints, got "
                    f"{' '.join(map(str, sizes))}")
    return sizes * 2 if len(sizes) == 1 else sizes
