"""Checkpoints and run states: .npz archives written atomically and read without pickle.

    save_checkpoint("results/best.npy", net, mean, std, class_names, config)
    net, meta = load_checkpoint("results/best.npy")    # meta: prep, class_names, config...

A checkpoint holds the weights, the preprocessing (mean, std, whitening) and `meta`, a JSON
string: activation, sizes, class names, the configuration. A run state (train.STATE_FILE) is
a checkpoint plus the optimiser's velocities, the random generator and the run's progress.
Both are read member by member by `read_archive`, which refuses anything outside its limits
before it is decompressed.
"""
import json
import math
import os
import warnings
import zipfile
from collections import namedtuple

import numpy as np

import cli
import config as cfg
import data_loader
import files
import limits
from cli import Error
from model import ACTIVATIONS, PARAM_NAMES, ThreeLayerNN

# --- checkpoints: an .npz archive (any file name), loadable without pickle -------------------


class CheckpointError(Error):
    """A checkpoint that is missing, corrupt, or not one of ours; the message is escaped for
    the terminal, as the paths and names it quotes may not be."""

    def __init__(self, message):
        super().__init__(cli.shown(message))


def save_checkpoint(path, net, mean, std, class_names, config, arrays=None, **extra):
    """Write weights, normalisation, class names and config to `path`, atomically.

    `arrays` are further named arrays (a resume state's velocities), `extra` further JSON.
    """
    meta = {"activation": net.activation, "hidden_size": list(net.hidden_size),
            "class_names": list(class_names), "config": config, **extra}
    arrays = {**net.params, **(arrays or {}), "mean": np.asarray(mean, np.float32),
              "std": np.asarray(std, np.float32), "meta": np.array(json.dumps(meta))}
    refused = too_large({name: (a.shape, a.dtype) for name, a in arrays.items()})
    if refused:  # nothing is written that load_checkpoint would refuse
        raise CheckpointError(f"cannot save {path}: {refused}")
    with files.atomic_write(path) as f:
        np.savez(f, **arrays)


def load_checkpoint(path, extra_arrays=None):
    """Load (net, meta) from `path`; meta holds mean, std, class_names, config and extras.

    `extra_arrays` maps the names of further arrays to their shapes; they must be there,
    finite and of the weights' dtype, and are returned in meta.
    """
    try:
        # The extra arrays have the weights' float type: 8 bytes an element at most.
        members = {**CHECKPOINT_MEMBERS, **{name: Member("f", 8 * math.prod(shape))
                                            for name, shape in (extra_arrays or {}).items()}}
        arrays = read_archive(path, members, "checkpoint", CheckpointError)
    except FileNotFoundError:
        raise CheckpointError(f"no model at {path}: train one first with "
                              f"`python train.py`") from None
    return _checkpoint_from_arrays(path, arrays, extra_arrays or {})


# --- reading .npz archives without trusting them ---------------------------------------------


Member = namedtuple("Member", "kinds max_bytes")
Member.__doc__ = """What an archive member may be: its dtype kinds (e.g. "f", "iu", "U") and the
largest size of its data in bytes."""

# A run state (train.STATE_FILE) is a checkpoint with the optimiser's velocities besides.
# `meta` is stored as UTF-32: 4 bytes a character.
CHECKPOINT_MEMBERS = {
    **{prefix + k: Member("f", limits.WEIGHT_BYTES if k[0] == "w" else limits.VECTOR_BYTES)
       for k in PARAM_NAMES for prefix in ("", "velocity_")},
    "mean": Member("f", limits.VECTOR_BYTES), "std": Member("f", limits.VECTOR_BYTES),
    "whitening": Member("f", limits.WEIGHT_BYTES), "meta": Member("U", 4 * limits.META_CHARS)}


def too_large(arrays, members=CHECKPOINT_MEMBERS):
    """Why read_archive would refuse one of `arrays` ({name: (shape, dtype)}) as larger than its
    member may be, in words; None if every one fits. Writers ask before they write."""
    for name, (shape, dtype) in arrays.items():
        size = math.prod(shape) * np.dtype(dtype).itemsize
        if name in members and size > members[name].max_bytes:
            return (f"{name} of shape {tuple(shape)} takes {size:,} bytes, more than the "
                    f"{members[name].max_bytes:,} a checkpoint may hold")
    return None


def read_archive(path, members, what="archive", error=Error):
    """The arrays of the .npz archive at `path`, as {name: array}, read without trusting it.

    `members` maps each name the archive may hold to its Member(kinds, max_bytes). Unknown,
    duplicate, object, structured or Fortran-ordered members and any member larger than its
    max_bytes are refused before they are decompressed, and reads are bounded whatever the
    headers say. Missing members are the caller's to check. A missing file raises
    FileNotFoundError; any other failure raises `error`: "<path> is not a readable <what> (why)".
    """
    try:
        # A crafted header can make NumPy warn; the error below says all, in one line.
        with files.open_regular(path) as f, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if f.read(len(np.lib.format.MAGIC_PREFIX)) == np.lib.format.MAGIC_PREFIX:
                raise ValueError("it holds a single array, not an .npz archive")
            return _read_zip(f, members)
    except FileNotFoundError:
        raise
    except Exception as exc:  # refusals, truncation, bad zip or .npy headers alike
        raise error(cli.shown(f"{path} is not a readable {what} ({exc})")) from None


def _read_zip(f, members):
    """The checked arrays of the zip archive in open file `f` (see `read_archive`)."""
    # zipfile parses the whole central directory into memory (600 bytes an entry): bound it
    # first, from the end record (a private helper, stable since Python 2).
    end = zipfile._EndRecData(f)
    if end is not None and end[zipfile._ECD_SIZE] > limits.ZIP_ENTRY_BYTES * len(members):
        raise ValueError(f"its directory of {end[zipfile._ECD_SIZE]} bytes lists more members "
                         f"than the {len(members)} it may hold")
    with zipfile.ZipFile(f) as archive:
        infos = archive.infolist()
        names = [info.filename.removesuffix(".npy") for info in infos]
        unknown = sorted({n for n in names if n not in members})
        if unknown:
            raise ValueError(f"unknown members {', '.join(unknown):.200}")
        if len(set(names)) != len(names):
            raise ValueError("a member stored twice")
        for name, info in zip(names, infos):
            if info.file_size > members[name].max_bytes + limits.NPY_HEADER_BYTES:
                raise ValueError(f"member {name} declares {info.file_size} bytes, more than "
                                 f"the {members[name].max_bytes} it may hold")
        arrays = {}
        for name, info in zip(names, infos):
            with archive.open(info) as stream:
                arrays[name] = _read_npy(stream, name, members[name])
        return arrays


def _read_npy(stream, name, member):
    """One .npy array from `stream`, refused (ValueError) unless its header matches `member`;
    reads at most the bytes its shape needs, plus one to notice more."""
    version = np.lib.format.read_magic(stream)
    readers = {(1, 0): np.lib.format.read_array_header_1_0,
               (2, 0): np.lib.format.read_array_header_2_0}
    if version not in readers:
        raise ValueError(f"member {name} is in .npy format {version}, not 1.0 or 2.0")
    shape, fortran, dtype = readers[version](stream, max_header_size=limits.NPY_HEADER_BYTES)
    if dtype.kind not in member.kinds or dtype.hasobject or dtype.fields or dtype.subdtype:
        raise ValueError(f"member {name} has dtype {dtype}, not of the kinds {member.kinds!r}")
    if fortran:
        raise ValueError(f"member {name} is stored in Fortran order")
    refused = too_large({name: (shape, dtype)}, {name: member})
    if refused:
        raise ValueError(f"member {refused}")
    size = math.prod(shape) * dtype.itemsize
    data = stream.read(size + 1)
    if len(data) != size:
        raise ValueError(f"member {name} holds {'more' if len(data) > size else 'less'} data "
                         f"than its shape {shape} needs")
    return np.frombuffer(bytearray(data), dtype).reshape(shape)


def _checkpoint_from_arrays(path, arrays, extra_arrays):
    def need(ok, what):
        if not ok:
            raise CheckpointError(f"{path} is not a valid checkpoint: {what}")

    missing = [k for k in (*PARAM_NAMES, "mean", "std", "meta") if k not in arrays]
    need(not missing, f"missing {', '.join(missing)}")
    # NpzFile hands back raw bytes for a member that is not in .npy format.
    odd = [k for k, a in arrays.items() if not isinstance(a, np.ndarray)]
    need(not odd, f"{', '.join(odd)} not stored as arrays")
    try:
        meta = json.loads(str(arrays["meta"][()]))
        activation, class_names = meta["activation"], meta["class_names"]
    except (ValueError, KeyError, TypeError, IndexError, RecursionError) as exc:
        raise CheckpointError(f"{path} is not a valid checkpoint: bad metadata ({exc})") from None
    need(isinstance(activation, str) and activation in ACTIVATIONS,
         f"unknown activation {activation!r}")
    longest = limits.CLASS_NAME_CHARS
    need(isinstance(class_names, list) and all(isinstance(n, str) and 0 < len(n) <= longest
                                                for n in class_names),
         f"class_names is not a list of names of 1 to {longest} characters")
    need(isinstance(meta.get("config", {}), dict), "config is not a dict")
    need(isinstance(meta.get("flip_average", False), bool), "flip_average is not true or false")
    shift = meta.get("test_shift", 0)
    need(type(shift) is int and 0 <= shift <= 16, "test_shift is not a whole number of 0 to 16")
    params = {k: arrays[k] for k in PARAM_NAMES}
    dtype = params["w1"].dtype
    need(dtype in (np.float32, np.float64), f"weights have dtype {dtype}, not float32/64")
    need(all(p.dtype == dtype for p in params.values()), "weights of mixed dtypes")
    need(all(p.ndim == (2 if k[0] == "w" else 1) for k, p in params.items()),
         "weights of the wrong rank")
    (d, h1), (h1b, h2), (h2b, c) = (params[k].shape for k in ("w1", "w2", "w3"))
    need(min(d, h1, h2, c) > 0, "a layer of size 0")
    need(h1 == h1b and h2 == h2b and params["b1"].shape == (h1,) and params["b2"].shape == (h2,)
         and params["b3"].shape == (c,), "layer shapes do not chain")
    need(len(class_names) == c, f"{len(class_names)} class names for {c} outputs")
    whitening = arrays.get("whitening")
    pixels = d
    if whitening is not None:
        need(isinstance(whitening, np.ndarray) and whitening.dtype == np.float32
             and whitening.ndim == 2 and whitening.shape[1] == d and np.isfinite(whitening).all(),
             f"whitening should be finite float32 of shape (pixels, {d})")
        pixels = whitening.shape[0]
    for k in ("mean", "std"):
        need(arrays[k].shape == (pixels,) and arrays[k].dtype == np.float32,
             f"{k} should be float32 of shape ({pixels},), got {arrays[k].dtype} "
             f"{arrays[k].shape}")
    need(all(np.isfinite(a).all() for a in (*params.values(), arrays["mean"], arrays["std"])),
         "weights or statistics hold NaN or infinity")
    need((arrays["std"] > 0).all(), "std has values <= 0")

    net = ThreeLayerNN(d, (h1, h2), c, activation, dtype=dtype,
                       dropout=meta.get("config", {}).get("dropout", 0.0))
    for k, p in params.items():
        setattr(net, k, np.ascontiguousarray(p))
    for name, shape in extra_arrays.items():
        a = arrays.get(name)
        need(isinstance(a, np.ndarray) and a.dtype == dtype and a.shape == tuple(shape)
             and np.isfinite(a).all(), f"{name} is missing, or not finite {dtype} of shape "
                                       f"{tuple(shape)}")
        meta[name] = a
    meta.update(mean=arrays["mean"], std=arrays["std"], class_names=class_names,
                prep=data_loader.Preprocessing(arrays["mean"], arrays["std"], whitening))
    return net, meta


# --- the state of a run: a checkpoint of the last epoch, plus what continuing it needs -------


def new_run():
    """The progress of a run before its first epoch, as the state file stores it."""
    return {"epoch": 0, "history": [], "best_acc": -1.0, "best_epoch": 0, "stopped": None,
            "flops": 0}


def save_model(path, net, prep, config, arrays=None, **extra):
    """best.npy (all that inference needs: weights, preprocessing, flip averaging), or with
    the optimiser's arrays the run state, through model.save_checkpoint."""
    whitening = {} if prep.whitening is None else {"whitening": prep.whitening}
    save_checkpoint(path, net, prep.mean, prep.std, data_loader.CLASS_NAMES, config,
                          arrays={**whitening, **(arrays or {})},
                          flip_average=config["flip_average"],
                          test_shift=config.get("test_shift", 0),
                          **extra)


def save_state(path, net, optimizer, rng, prep, config, run):
    """Write everything a resumed run needs after an epoch, atomically."""
    save_model(path, net, prep, config, optimizer.state(), run=run, rng=rng.bit_generator.state)


RECORD_KEYS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "tflop",
               "seconds")  # an epoch's record in a run's history, as training writes it


def check_run(run, epochs):
    """Refuse (ValueError) a progress record that is not one new_run and training write: every
    epoch's record whole and finite, the best the history's first best, the compute finite."""
    fresh = new_run()
    if not (isinstance(run, dict) and set(run) == set(fresh)):
        raise ValueError(f"its record holds not just {', '.join(fresh)}")
    if not all(finite(run[k]) for k in ("epoch", "best_epoch", "best_acc", "flops")):
        raise ValueError("a count that is not a number or not finite")
    history = run["history"]
    if not (isinstance(run["epoch"], int) and isinstance(run["best_epoch"], int)
            and 0 <= run["best_epoch"] <= run["epoch"] <= epochs and run["flops"] >= 0
            and isinstance(history, list) and len(history) == run["epoch"]
            and run["stopped"] in (None, "early_stopping")):
        raise ValueError(f"epochs that do not add up (epoch {run['epoch']!r} of {epochs})")
    for epoch, record in enumerate(history, start=1):
        if not (isinstance(record, dict) and set(record) == set(RECORD_KEYS)
                and type(record["epoch"]) is int and record["epoch"] == epoch
                and all(finite(record[k]) for k in RECORD_KEYS)):
            raise ValueError(f"the record of epoch {epoch} is not one training writes")
    accuracies = [record["val_acc"] for record in history]
    first_best = max(range(len(history)), key=accuracies.__getitem__, default=None)
    if (run["best_epoch"], run["best_acc"]) != ((0, -1.0) if first_best is None else
                                                (first_best + 1, accuracies[first_best])):
        raise ValueError(f"a best epoch ({run['best_epoch']}) that is not the history's")


def finite(x):
    """Whether `x` is a number (not a bool) that a float holds."""
    try:
        return type(x) in (int, float) and math.isfinite(x)
    except OverflowError:  # an int past the floats
        return False


def _same(a, b):
    return (a is None) == (b is None) and (a is None or np.array_equal(a, b))


def _option_change(key, stored, config):
    """How one option of a saved run differs from the one given, for the refusal."""
    flag = "--" + key.replace("_", "-")
    if key not in stored:
        return f"{flag} (not in the state: saved by another version)"
    if key not in config:
        return f"{flag} {str(stored[key])[:100]} (no such option in this version)"
    return f"{flag} {str(stored[key])[:100]} (given {config[key]})"  # it may be huge


def load_state(path, config, net, optimizer, rng, prep):
    """Put the run saved at `path` into net, optimizer and rng; return its progress record.

    Refuses a state whose configuration differs from `config`, naming the keys.
    """
    if not os.path.exists(path):
        raise cli.Error(f"nothing to resume in {os.path.dirname(path) or '.'}: it holds no "
                        f"{os.path.basename(path)}; start the run without --resume")
    shapes = {name: v.shape for name, v in optimizer.state().items()}
    saved, meta = load_checkpoint(path, extra_arrays=shapes)
    stored = meta.get("config", {})
    differ = sorted(k for k in set(stored) | set(config)
                    if k not in cfg.LOCAL_KEYS and stored.get(k) != config.get(k))
    if differ:
        raise cli.UsageError(f"--resume: {path} was saved with other options: " + ", ".join(
            cli.shown(_option_change(k, stored, config)) for k in differ))
    run = meta.get("run")
    try:
        check_run(run, config["epochs"])
        rng.bit_generator.state = meta["rng"]
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise CheckpointError(f"{path} is not a valid run state ({exc})") from None
    saved_prep = meta["prep"]
    if not all(_same(a, b) for a, b in zip(saved_prep, prep)):
        raise cli.Error(f"--resume: {path} was saved on other data (its normalisation "
                        f"statistics or whitening differ from this data's)")
    for name, p in net.params.items():
        p[...] = getattr(saved, name)
    optimizer.load_state(meta)
    return run
