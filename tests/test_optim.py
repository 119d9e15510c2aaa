"""optim.py: the SGD step is the formula, and its L2 is the gradient of loss_fun's."""
import numpy as np
import pytest

import model
import optim


@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, False), (0.9, True)])
def test_sgd_matches_the_formula(momentum, nesterov, implementation):
    rng = np.random.default_rng(0)
    params = {"w1": rng.normal(size=(2, 4)), "b1": rng.normal(size=4)}
    opt = optim.SGD(params, momentum, nesterov, reg=0.1)
    w, b = params["w1"].copy(), params["b1"].copy()
    vw, vb = np.zeros_like(w), np.zeros_like(b)
    for _ in range(3):
        gw, gb = rng.normal(size=w.shape), rng.normal(size=b.shape)
        dw = gw + 0.1 * w  # L2 on weights only
        vw, vb = momentum * vw - 0.5 * dw, momentum * vb - 0.5 * gb
        if nesterov:
            w, b = w + momentum * vw - 0.5 * dw, b + momentum * vb - 0.5 * gb
        else:
            w, b = w + vw, b + vb
        opt.step(params, {"w1": gw.copy(), "b1": gb.copy()}, 0.5)
        assert np.allclose(params["w1"], w) and np.allclose(params["b1"], b)


def test_the_optimisers_l2_is_the_gradient_of_loss_funs_l2():
    """L2 lives in the optimiser; the report's loss_fun adds 0.5*reg*|w|^2. One plain SGD step
    with lr 1 from backward_pass's gradients must move each parameter by the numerical
    gradient of loss_fun."""
    rng = np.random.default_rng(0)
    net = model.ThreeLayerNN(12, (7, 5), 4, dtype=np.float64, seed=1)
    x, y, reg = rng.normal(size=(6, 12)), rng.integers(0, 4, 6), 0.3
    before = {k: p.copy() for k, p in net.params.items()}
    log_probs, cache = net.forward_pass(x)
    optim.SGD(net.params, reg=reg).step(net.params, net.backward_pass(log_probs, y, cache), 1.0)
    steps = {name: before[name] - p for name, p in net.params.items()}
    for name, p in net.params.items():
        p[...] = before[name]
    for name, p in net.params.items():
        numeric = np.zeros_like(p)
        for i in np.ndindex(p.shape):
            p[i] += 1e-6
            up = net.loss_fun(x, y, reg)
            p[i] -= 2e-6
            numeric[i] = (up - net.loss_fun(x, y, reg)) / 2e-6
            p[i] += 1e-6
        assert np.allclose(steps[name], numeric, rtol=1e-5, atol=1e-8), name
        assert np.allclose(net.backward(x, y, reg)[name], numeric, rtol=1e-5, atol=1e-8), name
