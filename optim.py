"""Optimisers: they own the update rule and the L2 term, and nothing else.

The contract, for SGD and for any optimiser added beside it:
- `step(params, grads, lr)` updates the arrays of `params` in place. It CONSUMES `grads`:
  their arrays are used as scratch space and hold garbage afterwards (they are fresh each
  step, so reusing them saves memory traffic on every step).
- L2 lives here: a weight's step uses grad + reg * weight, the gradient of the loss's
  0.5 * reg * |w|^2 (biases are not regularised). The model's backward_pass leaves it out.
- `state()` returns the arrays a resumed run needs (e.g. velocities), `load_state(state)` puts
  them back, so that a resumed run continues bit for bit.
"""
import numpy as np

REGULARIZED = ("w1", "w2", "w3")


class SGD:
    """Minibatch SGD with L2 and optional (Nesterov) momentum.

    The update is memory-bound: it runs over cache-sized blocks, so that its few elementwise
    passes hit the CPU cache instead of memory, and writes no temporaries (a scratch block).
    """

    BLOCK = 1 << 18  # elements (1 MB of float32): the fastest of 2**15 ... 2**19 here

    def __init__(self, params, momentum=0.0, nesterov=False, reg=0.0):
        self.momentum, self.nesterov = momentum, nesterov
        self.reg = {name: reg if name in REGULARIZED else 0.0 for name in params}
        self.velocity = {k: np.zeros_like(p) for k, p in params.items()} if momentum else {}
        self.scratch = np.empty(self.BLOCK, next(iter(params.values())).dtype)

    def state(self):
        return {f"velocity_{k}": v for k, v in self.velocity.items()}

    def load_state(self, state):
        for k, v in self.velocity.items():
            v[...] = state[f"velocity_{k}"]

    def step(self, params, grads, lr):
        """p -= lr * (g + reg * p), through the momentum buffer when there is one."""
        for name, p in params.items():
            # Flat views (parameters, gradients and velocities are contiguous).
            p, g = p.reshape(-1), grads[name].reshape(-1)
            v = self.velocity.get(name)
            v = None if v is None else v.reshape(-1)
            for i in range(0, p.size, self.BLOCK):
                block = slice(i, i + self.BLOCK)
                self._update(p[block], g[block], None if v is None else v[block], lr,
                             self.reg[name])

    def _update(self, p, g, v, lr, reg):
        scratch = self.scratch[:p.size]
        if reg:
            g += np.multiply(p, reg, out=scratch)
        g *= lr
        if v is None:
            p -= g
            return
        v *= self.momentum
        v -= g
        if self.nesterov:  # look ahead: p += mu * v_new - lr * g
            p -= g
            p += np.multiply(v, self.momentum, out=scratch)
        else:
            p += v

