"""ThreeLayerNN: gradients checked against finite differences, losses, learning."""
import numpy as np
import pytest

import cli
import model
from model import ACTIVATIONS, ThreeLayerNN


def numerical_gradient(f, x, h=1e-5):
    """Centred finite differences of scalar f() with respect to array x, in place."""
    grad = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = x[i]
        x[i] = old + h
        plus = f()
        x[i] = old - h
        minus = f()
        x[i] = old
        grad[i] = (plus - minus) / (2 * h)
    return grad


def relative_error(a, b):
    return np.max(np.abs(a - b) / np.maximum(1e-8, np.abs(a) + np.abs(b)))


def tiny_problem(activation, dropout=0.0, seed=0):
    rng = np.random.default_rng(seed)
    net = ThreeLayerNN(7, (5, 4), 3, activation, seed=seed, dtype=np.float64, dropout=dropout)
    for name in ("b1", "b2", "b3"):  # non-zero biases exercise their gradients too
        getattr(net, name)[:] = rng.normal(0, 0.1, getattr(net, name).shape)
    x = rng.normal(size=(6, 7))
    y = rng.integers(0, 3, size=6)
    return net, x, y


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("label_smoothing,dropout", [(0.0, 0.0), (0.1, 0.0), (0.0, 0.3), (0.2, 0.5)])
def test_backward_matches_finite_differences(activation, label_smoothing, dropout):
    net, x, y = tiny_problem(activation, dropout)
    reg = 0.1
    # The same seed gives the same dropout masks in every evaluation of the loss.
    rng = lambda: np.random.default_rng(1) if dropout else None
    loss = lambda: net.loss_fun(x, y, reg, label_smoothing, dropout_rng=rng())
    grads = net.backward(x, y, reg, label_smoothing, dropout_rng=rng())
    assert set(grads) == set(model.PARAM_NAMES)
    for name, param in net.params.items():
        assert grads[name].shape == param.shape
        err = relative_error(grads[name], numerical_gradient(loss, param))
        assert err < 1e-6, f"{activation} {name}: relative error {err:.2e}"


def test_dropout_masks_and_scales():
    net, x, y = tiny_problem("relu", dropout=0.5)
    a = np.ones((1000, 50))
    out, mask = model.dropout_forward(a, 0.5, np.random.default_rng(0))
    assert set(np.unique(out)) == {0.0, 2.0}
    assert abs(out.mean() - 1) < 0.05
    # Without an rng (evaluation) dropout is off and forward is deterministic.
    assert np.array_equal(net.forward(x), net.forward(x))


def test_loss_on_hand_computed_case():
    net = ThreeLayerNN(2, 2, 2, "relu", dtype=np.float64)
    net.w1[:] = [[1, 0], [0, 1]]
    net.w2[:] = [[1, 0], [0, 1]]
    net.w3[:] = [[1, 0], [0, 1]]
    for b in (net.b1, net.b2, net.b3):
        b[:] = 0
    x = np.array([[2.0, 0.0]])
    # relu passes x unchanged, so the scores are (2, 0): p(class 0) = e^2 / (e^2 + 1).
    expected_ce = -np.log(np.exp(2) / (np.exp(2) + 1))
    assert net.loss_fun(x, np.array([0])) == pytest.approx(expected_ce)
    # Each weight matrix is the identity: |w|^2 = 2, three of them, times 0.5 * lambda.
    assert net.loss_fun(x, np.array([0]), reg_lambda=0.1) == pytest.approx(expected_ce + 0.3)
    # Label smoothing eps mixes in the mean negative log-probability over classes.
    nll1 = -np.log(1 / (np.exp(2) + 1))
    assert net.loss_fun(x, np.array([0]), label_smoothing=0.2) == pytest.approx(
        0.8 * expected_ce + 0.2 * (expected_ce + nll1) / 2)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_stable_at_extreme_inputs(activation):
    net = ThreeLayerNN(4, 3, 2, activation)
    x = np.array([[1e30, -1e30, 3e4, -3e4]], dtype=np.float32)
    with np.errstate(over="raise", divide="raise", invalid="raise"):
        probs = net.forward(np.clip(x, -1e4, 1e4))
    assert np.isfinite(probs).all() and probs.sum() == pytest.approx(1, abs=1e-5)
    with np.errstate(over="raise", divide="raise"):
        log_probs = model.log_softmax(np.array([[1e4, -1e4, 0]], dtype=np.float32))
    assert np.isfinite(log_probs).all()


def test_float32_stays_float32():
    net, x, y = tiny_problem("gelu")
    net = ThreeLayerNN(7, (5, 4), 3, "gelu")
    x = x.astype(np.float32)
    grads = net.backward(x, y, 0.1, 0.1, dropout_rng=np.random.default_rng(0))
    assert net.forward(x).dtype == np.float32
    assert all(g.dtype == np.float32 for g in grads.values())


def test_init_suits_activation_and_is_seeded():
    relu = ThreeLayerNN(1000, 500, 10, "relu", seed=3)
    tanh = ThreeLayerNN(1000, 500, 10, "tanh", seed=3)
    assert relu.w1.std() == pytest.approx(np.sqrt(2 / 1000), rel=0.02)  # He
    assert tanh.w1.std() == pytest.approx(np.sqrt(2 / 1500), rel=0.02)  # Glorot
    assert np.array_equal(relu.w2, ThreeLayerNN(1000, 500, 10, "relu", seed=3).w2)
    assert not np.array_equal(relu.w2, ThreeLayerNN(1000, 500, 10, "relu", seed=4).w2)


def test_unknown_activation_lists_the_choices():
    with pytest.raises(cli.Error, match="relu.*tanh"):
        ThreeLayerNN(4, 3, 2, "swish2")


def test_learns_a_small_problem_well_above_chance():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 20)) * 2
    y = rng.integers(0, 4, 400)
    x = (centers[y] + rng.normal(size=(400, 20))).astype(np.float32)
    net = ThreeLayerNN(20, 32, 4, "relu")
    for _ in range(200):
        for name, g in net.backward(x, y, 1e-4).items():
            getattr(net, name)[...] -= 0.1 * g
    assert net.accuracy(x, y) > 0.9


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_mixup_gradients_match_finite_differences(label_smoothing):
    """With MixUp the targets are lam * onehot(y) + (1 - lam) * onehot(y2), then smoothed."""
    net, x, y = tiny_problem("relu")
    mixup = (0.3, np.roll(y, 1))
    loss = lambda: model.cross_entropy(net.forward_pass(x)[0], y, label_smoothing, mixup)
    log_probs, cache = net.forward_pass(x)
    grads = net.backward_pass(log_probs, y, cache, label_smoothing, mixup)
    for name, param in net.params.items():
        err = relative_error(grads[name], numerical_gradient(loss, param))
        assert err < 1e-6, f"{name}: relative error {err:.2e}"
    targets = model.targets(y, 3, label_smoothing, mixup)
    assert np.allclose(targets.sum(axis=1), 1) and targets.min() >= label_smoothing / 3
