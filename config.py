"""Defaults, presets and class names; every key is a command-line option of train.py."""
import math

from cli import Error

CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer",
               "dog", "frog", "horse", "ship", "truck"]

# The default is the best recipe measured to finish within 10 minutes on a 2-core CPU
# (see the README's results table): wide ReLU layers, Nesterov SGD on a one-cycle
# schedule, L2, label smoothing and cheap flip/shift augmentation. The report's recipe
# (512x512, plain step decay, no augmentation) is kept as the `report` preset.
DEFAULT_CONFIG = {
    "hidden_size": [1024, 1024],
    "activation": "relu",
    "epochs": 80,
    "batch_size": 128,
    "lr": 0.05,
    "lr_schedule": "onecycle",
    "lr_decay": 0.95,
    "lr_step": 1,
    "warmup_epochs": 2.0,
    "momentum": 0.9,
    "nesterov": True,
    "reg": 5e-4,
    "dropout": 0.0,
    "label_smoothing": 0.1,
    "flip": True,
    "translate": 2,
    "val_size": 5000,
    "patience": 0,
    "seed": 0,
    "dtype": "float32",
    "data_dir": "data",
    "save_dir": "results",
}

HELP = {
    "hidden_size": "sizes of the two hidden layers: one int for both, or two ints",
    "activation": "hidden-layer activation",
    "epochs": "passes over the training split",
    "batch_size": "images per SGD step",
    "lr": "peak learning rate",
    "lr_schedule": "learning-rate schedule after warmup: step (multiply by --lr-decay "
                   "every --lr-step epochs), cosine, onecycle (linear down to 0), constant",
    "lr_decay": "factor of the step schedule",
    "lr_step": "epochs between two steps of the step schedule",
    "warmup_epochs": "epochs of linear warmup from 0 to --lr (may be fractional)",
    "momentum": "SGD momentum (0 for plain SGD)",
    "nesterov": "use Nesterov momentum",
    "reg": "L2 strength lambda: the loss adds 0.5*lambda*sum(w**2) over w1, w2, w3",
    "dropout": "inverted-dropout probability on both hidden layers (0 = off)",
    "label_smoothing": "cross-entropy label smoothing epsilon (0 = off)",
    "flip": "random horizontal flips of training images",
    "translate": "random shifts of training images by up to this many pixels (0 = off)",
    "val_size": "training images held out for validation (stratified)",
    "patience": "stop after this many epochs without a better validation accuracy (0 = never)",
    "seed": "random seed: the same seed gives the same run",
    "dtype": "floating-point type of the network",
    "data_dir": "folder holding (or receiving) CIFAR-10",
    "save_dir": "folder for best.npy, history.json and the plots",
}

CHOICES = {
    "lr_schedule": ["step", "cosine", "onecycle", "constant"],
    "dtype": ["float32", "float64"],
}

# Named recipes that override the defaults: `python train.py --preset NAME`.
PRESETS = {
    "default": {},
    # The report's configuration, for comparison.
    "report": {"hidden_size": [512, 512], "epochs": 100, "batch_size": 256, "lr": 0.01,
               "lr_schedule": "step", "lr_decay": 0.95, "warmup_epochs": 0.0,
               "momentum": 0.0, "nesterov": False, "reg": 1e-3, "label_smoothing": 0.0,
               "flip": False, "translate": 0},
    # The report's accuracy in about a minute.
    "fast": {"hidden_size": [512, 512], "epochs": 10, "batch_size": 128, "lr": 0.05,
             "warmup_epochs": 1.0, "translate": 0},
    # The longer recipe, within 30 minutes: three times the epochs, with dropout against the
    # overfitting they bring. (2048x2048 for 80 epochs took about as long for less: README.)
    "best": {"epochs": 240, "dropout": 0.1},
}


def make_config(preset="default", **overrides):
    """The default configuration, updated by a preset and then by explicit overrides."""
    if preset not in PRESETS:
        raise Error(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    config = {**DEFAULT_CONFIG, **PRESETS[preset], **overrides}
    unknown = set(config) - set(DEFAULT_CONFIG)
    if unknown:
        raise Error(f"unknown configuration keys: {', '.join(sorted(unknown))}")
    hidden = config["hidden_size"]
    hidden = [hidden] if isinstance(hidden, int) else list(hidden)
    config["hidden_size"] = hidden * 2 if len(hidden) == 1 else hidden
    check(config)
    return config


def check(config):
    """Refuse values that cannot work, before any work starts."""
    def need(ok, message):
        if not ok:
            raise Error(message)

    for key, value in config.items():  # inf and nan pass the comparisons below
        need(not isinstance(value, float) or math.isfinite(value),
             f"--{key.replace('_', '-')} must be a finite number, got {value}")
    hidden = config["hidden_size"]
    need(len(hidden) == 2 and all(isinstance(h, int) and h > 0 for h in hidden),
         f"--hidden-size takes one or two positive ints, got {hidden}")
    for key in ("epochs", "batch_size", "lr_step"):
        need(config[key] > 0, f"--{key.replace('_', '-')} must be positive, got {config[key]}")
    need(config["lr"] > 0, f"--lr must be positive, got {config['lr']}")
    need(0 < config["lr_decay"] <= 1, f"--lr-decay must be in (0, 1], got {config['lr_decay']}")
    need(config["warmup_epochs"] >= 0, "--warmup-epochs must be >= 0")
    need(0 <= config["momentum"] < 1, f"--momentum must be in [0, 1), got {config['momentum']}")
    need(config["reg"] >= 0, f"--reg must be >= 0, got {config['reg']}")
    need(0 <= config["dropout"] < 1, f"--dropout must be in [0, 1), got {config['dropout']}")
    need(0 <= config["label_smoothing"] < 1,
         f"--label-smoothing must be in [0, 1), got {config['label_smoothing']}")
    need(0 <= config["translate"] <= 16, f"--translate must be in [0, 16], got {config['translate']}")
    need(config["val_size"] > 0, f"--val-size must be positive, got {config['val_size']}")
    need(config["patience"] >= 0, "--patience must be >= 0")
    need(config["seed"] >= 0, f"--seed must be >= 0, got {config['seed']}")
    for key, options in CHOICES.items():
        need(config[key] in options, f"--{key.replace('_', '-')} must be one of "
                                     f"{', '.join(options)}, got {config[key]!r}")
