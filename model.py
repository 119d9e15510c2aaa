"""ThreeLayerNN: input -> hidden -> hidden -> output, with backpropagation derived by hand.

Layers follow the CS231n pattern: a forward returns (out, cache) and its backward
takes (dout, cache). Activations live in one registry, so adding one is one entry.
The network knows arrays only: where images come from and how they are preprocessed is
data_loader.py's, how they are scored inference.py's, how they are saved checkpoint.py's.
"""
from collections import namedtuple

import numpy as np

from cli import Error

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


def targets(y, n_classes, label_smoothing=0.0, mixup=None, dtype=np.float64):
    """The target distributions (N, C): one-hot labels y, or with `mixup` = (lam, y2) the mix
    lam * onehot(y) + (1 - lam) * onehot(y2), each smoothed towards uniform."""
    rows = np.arange(len(y))
    lam, y2 = mixup or (1.0, y)
    t = np.full((len(y), n_classes), label_smoothing / n_classes, dtype)
    t[rows, y] += (1 - label_smoothing) * lam
    t[rows, y2] += (1 - label_smoothing) * (1 - lam)
    return t


def cross_entropy_backward(log_probs, y, label_smoothing=0.0, mixup=None):
    """d(mean cross-entropy)/d(scores) = (softmax(s) - targets) / N (see `targets`)."""
    n, c = log_probs.shape
    return (np.exp(log_probs) - targets(y, c, label_smoothing, mixup, log_probs.dtype)) / \
        log_probs.dtype.type(n)


def cross_entropy(log_probs, y, label_smoothing=0.0, mixup=None):
    """Mean cross-entropy against the targets (see `targets`)."""
    n, c = log_probs.shape
    return float(-(targets(y, c, label_smoothing, mixup) * log_probs).sum() / n)


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

    def backward_pass(self, log_probs, y, cache, label_smoothing=0.0, mixup=None):
        """Gradients of the mean cross-entropy (targets smoothed, or mixed: see `targets`), the
        reverse of forward_pass.

            ds  = (softmax(s) - targets) / N                         (N, C)
            dw3 = a2.T @ ds  (H2, C)   db3 = ds.sum(0)   da2 = ds @ w3.T     (N, H2)
            dz2 = da2 * m2 * f'(z2)
            dw2 = a1.T @ dz2 (H1, H2)  db2 = dz2.sum(0)  da1 = dz2 @ w2.T    (N, H1)
            dz1 = da1 * m1 * f'(z1)
            dw1 = x.T @ dz1  (D, H1)   db1 = dz1.sum(0)
        No L2 term: the optimiser adds it (see the class docstring).
        """
        dscores = cross_entropy_backward(log_probs, y, label_smoothing, mixup)
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

    def log_probabilities(self, x, batch_size=2000):
        """Log-probabilities (N, C) of many inputs x (N, D), a batch at a time so that memory
        stays small."""
        out = np.empty((len(x), self.output_size), self.dtype)
        for start in range(0, len(x), batch_size):
            chunk = np.asarray(x[start:start + batch_size], dtype=self.dtype)
            out[start:start + len(chunk)] = self.forward_pass(chunk)[0]
        return out

    def predict(self, x):
        """Predicted class indices of inputs x (N, D)."""
        return self.log_probabilities(x).argmax(axis=1)

    def accuracy(self, x, y):
        return float(np.mean(self.predict(x) == y))
