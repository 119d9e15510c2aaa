"""ThreeLayerNN: input -> hidden -> hidden -> output, with backpropagation derived by hand.

Layers follow the CS231n pattern: a forward returns (out, cache) and its backward
takes (dout, cache). Activations live in one registry, so adding one is one entry.
"""
import json
import math
import warnings
import zipfile
from collections import namedtuple

import numpy as np

import cli
import data_loader
from cli import Error, atomic_write

PARAM_NAMES = ("w1", "b1", "w2", "b2", "w3", "b3")

# --- activations: f(z) and f'(z) written with a = f(z) at hand ----------------------------


def _sigmoid(z):
    # exp(-|z|) never overflows: for z >= 0 it is 1/(1+e), for z < 0 it is e/(1+e).
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1, e) / (1 + e)


_GELU_C = float(np.sqrt(2 / np.pi))


def _gelu(z):
    return 0.5 * z * (1 + np.tanh(_GELU_C * (z + 0.044715 * z**3)))


def _gelu_grad(z, a):
    t = np.tanh(_GELU_C * (z + 0.044715 * z**3))
    return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * _GELU_C * (1 + 3 * 0.044715 * z * z)


LEAK = 0.01

Activation = namedtuple("Activation", "forward derivative init")
ACTIVATIONS = {
    "relu": Activation(lambda z: np.maximum(z, 0), lambda z, a: z > 0, "he"),
    "leaky_relu": Activation(lambda z: np.where(z > 0, z, LEAK * z),
                             lambda z, a: np.where(z > 0, 1, LEAK).astype(z.dtype), "he"),
    "elu": Activation(lambda z: np.where(z > 0, z, np.expm1(np.minimum(z, 0))),
                      lambda z, a: np.where(z > 0, 1, a + 1), "he"),
    "gelu": Activation(_gelu, _gelu_grad, "he"),
    "silu": Activation(lambda z: z * _sigmoid(z),
                       lambda z, a: (s := _sigmoid(z)) + a * (1 - s), "he"),
    "sigmoid": Activation(_sigmoid, lambda z, a: a * (1 - a), "xavier"),
    "tanh": Activation(np.tanh, lambda z, a: 1 - a * a, "xavier"),
}


def get_activation(name):
    if name not in ACTIVATIONS:
        raise Error(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


# --- layers ---------------------------------------------------------------------------------


def affine_forward(x, w, b):
    out = x @ w
    out += b  # in place: no second (N, H) temporary
    return out, (x, w)


def affine_backward(dout, cache, need_dx=True):
    """Gradients of x @ w + b; the first layer skips dx, a third of its cost."""
    x, w = cache
    dx = dout @ w.T if need_dx else None
    return dx, x.T @ dout, dout.sum(axis=0)


def activation_forward(z, name):
    a = ACTIVATIONS[name].forward(z)
    return a, (z, a, name)


def activation_backward(da, cache):
    """da * f'(z), computed in da: it is always fresh from the layer above."""
    z, a, name = cache
    da *= ACTIVATIONS[name].derivative(z, a)
    return da


def dropout_forward(a, p, rng):
    """Inverted dropout: scale the kept units by 1/(1-p) so inference needs no change."""
    if not p or rng is None:
        return a, None
    mask = (rng.random(a.shape, dtype=a.dtype) >= p) / a.dtype.type(1 - p)
    return a * mask, mask


def dropout_backward(da, mask):
    return da if mask is None else da * mask


def log_softmax(scores):
    # Log-sum-exp with the row maximum subtracted: no overflow, and no log(0).
    shifted = scores - scores.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def cross_entropy_backward(log_probs, y, label_smoothing=0.0):
    """d(mean cross-entropy)/d(scores) against targets smoothed towards uniform."""
    n, c = log_probs.shape
    dscores = np.exp(log_probs)
    dscores -= label_smoothing / c
    dscores[np.arange(n), y] -= 1 - label_smoothing
    return dscores / log_probs.dtype.type(n)


def cross_entropy(log_probs, y, label_smoothing=0.0):
    """Mean cross-entropy against targets smoothed towards uniform by `label_smoothing`."""
    n = len(y)
    nll = -log_probs[np.arange(n), y].mean()
    if not label_smoothing:
        return float(nll)
    return float((1 - label_smoothing) * nll - label_smoothing * log_probs.mean())


# --- the network ----------------------------------------------------------------------------

# What forward_pass keeps for backward_pass: each layer's own cache, named by layer.
Cache = namedtuple("Cache", "affine1 act1 drop1 affine2 act2 drop2 affine3")


class ThreeLayerNN:
    """Fully connected network with two hidden layers and a softmax output.

    Training uses forward_pass and backward_pass; loss_fun, backward, predict and accuracy are
    the report's public API built on them, and the tests check them against finite
    differences. L2 lives in the optimiser (optim.SGD), not here: backward_pass returns the
    gradients of the data loss alone; only the report's loss_fun and backward add it.
    """

    def __init__(self, input_size, hidden_size, output_size, activation="relu", seed=0,
                 dtype=np.float32, dropout=0.0):
        h1, h2 = (hidden_size, hidden_size) if np.isscalar(hidden_size) else hidden_size
        self.hidden_size = (int(h1), int(h2))
        self.activation = activation
        self.dropout = dropout
        self.dtype = np.dtype(dtype)
        init = get_activation(activation).init
        rng = np.random.default_rng(seed)
        sizes = [input_size, h1, h2, output_size]
        for i, (fan_in, fan_out) in enumerate(zip(sizes, sizes[1:]), start=1):
            # He keeps ReLU-like activations' variance; Glorot suits tanh, sigmoid and the
            # linear output layer.
            he = init == "he" and i < 3
            std = np.sqrt(2 / fan_in) if he else np.sqrt(2 / (fan_in + fan_out))
            setattr(self, f"w{i}", (rng.standard_normal((fan_in, fan_out)) * std).astype(dtype))
            setattr(self, f"b{i}", np.zeros(fan_out, dtype=dtype))

    @property
    def params(self):
        return {name: getattr(self, name) for name in PARAM_NAMES}

    @property
    def input_size(self):
        return self.w1.shape[0]

    @property
    def output_size(self):
        return self.w3.shape[1]

    def flops(self, training=False):
        """FLOPs per image (2 per multiply-add) of the matrix products: the forward pass, and
        with `training` the backward pass too (no input gradient at the first layer)."""
        (d, h1), h2, c = self.w1.shape, self.hidden_size[1], self.output_size
        macs = d * h1 + h1 * h2 + h2 * c
        return 2 * macs + (4 * macs - 2 * d * h1 if training else 0)

    def forward_pass(self, x, dropout_rng=None):
        """Log-probabilities (N, C) of inputs x (N, D), and the Cache backward_pass needs.

            z1 = x @ w1 + b1        (N, H1)     a1 = f(z1) * m1    (dropout mask m1)
            z2 = a1 @ w2 + b2       (N, H2)     a2 = f(z2) * m2
            s  = a2 @ w3 + b3       (N, C)      log p = s - logsumexp(s)
        Dropout runs only when an rng is given (training); inference passes none.
        """
        z1, fc1 = affine_forward(x, self.w1, self.b1)
        a1, act1 = activation_forward(z1, self.activation)
        a1, drop1 = dropout_forward(a1, self.dropout, dropout_rng)
        z2, fc2 = affine_forward(a1, self.w2, self.b2)
        a2, act2 = activation_forward(z2, self.activation)
        a2, drop2 = dropout_forward(a2, self.dropout, dropout_rng)
        scores, fc3 = affine_forward(a2, self.w3, self.b3)
        return log_softmax(scores), Cache(fc1, act1, drop1, fc2, act2, drop2, fc3)

    def backward_pass(self, log_probs, y, cache, label_smoothing=0.0):
        """Gradients of the mean (label-smoothed) cross-entropy, the reverse of forward_pass.

            ds  = (softmax(s) - targets) / N                         (N, C)
            dw3 = a2.T @ ds  (H2, C)   db3 = ds.sum(0)   da2 = ds @ w3.T     (N, H2)
            dz2 = da2 * m2 * f'(z2)
            dw2 = a1.T @ dz2 (H1, H2)  db2 = dz2.sum(0)  da1 = dz2 @ w2.T    (N, H1)
            dz1 = da1 * m1 * f'(z1)
            dw1 = x.T @ dz1  (D, H1)   db1 = dz1.sum(0)
        No L2 term: the optimiser adds it (see the class docstring).
        """
        dscores = cross_entropy_backward(log_probs, y, label_smoothing)
        da2, dw3, db3 = affine_backward(dscores, cache.affine3)
        dz2 = activation_backward(dropout_backward(da2, cache.drop2), cache.act2)
        da1, dw2, db2 = affine_backward(dz2, cache.affine2)
        dz1 = activation_backward(dropout_backward(da1, cache.drop1), cache.act1)
        _, dw1, db1 = affine_backward(dz1, cache.affine1, need_dx=False)
        return {"w1": dw1, "b1": db1, "w2": dw2, "b2": db2, "w3": dw3, "b3": db3}

    # --- the report's API ---------------------------------------------------------------------

    def forward(self, x):
        """Class probabilities, shape (N, output_size)."""
        return np.exp(self.forward_pass(np.asarray(x, dtype=self.dtype))[0])

    def l2_penalty(self, reg_lambda):
        return 0.5 * reg_lambda * sum(float(np.vdot(w, w)) for w in (self.w1, self.w2, self.w3))

    def loss_fun(self, x, y, reg_lambda=0.0, label_smoothing=0.0, dropout_rng=None):
        """Mean cross-entropy + 0.5 * reg_lambda * (|w1|^2 + |w2|^2 + |w3|^2); biases are free."""
        log_probs, _ = self.forward_pass(x, dropout_rng)
        return cross_entropy(log_probs, y, label_smoothing) + self.l2_penalty(reg_lambda)

    def backward(self, x, y, reg_lambda=0.0, label_smoothing=0.0, dropout_rng=None):
        """Gradients of exactly loss_fun, as a dict keyed 'w1' ... 'b3'."""
        log_probs, cache = self.forward_pass(x, dropout_rng)
        grads = self.backward_pass(log_probs, y, cache, label_smoothing)
        for name in ("w1", "w2", "w3"):  # d(0.5 * lambda * |w|^2) / dw
            grads[name] += reg_lambda * getattr(self, name)
        return grads

    def predict(self, x):
        """Predicted class indices of inputs x (N, D)."""
        return log_probabilities(self, x).argmax(axis=1)

    def accuracy(self, x, y):
        return float(np.mean(self.predict(x) == y))


def log_probabilities(net, images, prep=None, flip_average=False, batch_size=2000):
    """Log-probabilities (N, C) of many inputs, a batch at a time so that memory stays small.

    uint8 images go through `prep` (a data_loader.Preprocessing) first, float inputs are used
    as given. With `flip_average` each image's probabilities are averaged with its mirror's.
    """
    def inputs(chunk):
        return chunk.astype(net.dtype) if prep is None else \
            data_loader.preprocess(chunk, prep, net.dtype)

    out = np.empty((len(images), net.output_size), net.dtype)
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        log_probs = net.forward_pass(inputs(chunk))[0]
        if flip_average:
            mirrored = net.forward_pass(inputs(data_loader.flip(chunk)))[0]
            log_probs = np.logaddexp(log_probs, mirrored) - np.log(2, dtype=net.dtype)
        out[start:start + len(chunk)] = log_probs
    return out


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
    with atomic_write(path) as f:
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

MAX_NAME = 100  # characters in a class name: longer ones break the plots' layout
CENTRAL_BYTES_PER_MEMBER = 1024  # a member's zip directory entry (NumPy's take about 80)
NPY_HEADER_BYTES = 4096  # the largest .npy header accepted (NumPy writes 128 bytes)
MAX_WEIGHT_BYTES = 1 << 27  # 128 MiB: a 4096 x 4096 float64 or a 5792 x 5792 float32 matrix
MAX_VECTOR_BYTES = 1 << 20  # a bias, mean or std: up to 131,072 float64 values
MAX_META_BYTES = 1 << 24  # the JSON string, 4 bytes a character: a state's history of
# 10,000 epochs (config.py's limit) takes about 8 MB

# A run state (train.STATE_FILE) is a checkpoint with the optimiser's velocities besides.
CHECKPOINT_MEMBERS = {
    **{prefix + k: Member("f", MAX_WEIGHT_BYTES if k[0] == "w" else MAX_VECTOR_BYTES)
       for k in PARAM_NAMES for prefix in ("", "velocity_")},
    "mean": Member("f", MAX_VECTOR_BYTES), "std": Member("f", MAX_VECTOR_BYTES),
    "whitening": Member("f", MAX_WEIGHT_BYTES), "meta": Member("U", MAX_META_BYTES)}


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
        with cli.open_regular(path) as f, warnings.catch_warnings():
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
    if end is not None and end[zipfile._ECD_SIZE] > CENTRAL_BYTES_PER_MEMBER * len(members):
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
            if info.file_size > members[name].max_bytes + NPY_HEADER_BYTES:
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
    shape, fortran, dtype = readers[version](stream, max_header_size=NPY_HEADER_BYTES)
    if dtype.kind not in member.kinds or dtype.hasobject or dtype.fields or dtype.subdtype:
        raise ValueError(f"member {name} has dtype {dtype}, not of the kinds {member.kinds!r}")
    if fortran:
        raise ValueError(f"member {name} is stored in Fortran order")
    size = math.prod(shape) * dtype.itemsize
    if size > member.max_bytes:
        raise ValueError(f"member {name} has shape {shape}: {size} bytes, more than the "
                         f"{member.max_bytes} it may hold")
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
    need(isinstance(class_names, list) and all(isinstance(n, str) and 0 < len(n) <= MAX_NAME
                                                for n in class_names),
         f"class_names is not a list of names of 1 to {MAX_NAME} characters")
    need(isinstance(meta.get("config", {}), dict), "config is not a dict")
    need(isinstance(meta.get("flip_average", False), bool), "flip_average is not true or false")
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
