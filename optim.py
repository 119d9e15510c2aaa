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

import kernels

REGULARIZED = ("w1", "w2", "w3")


class SGD:
    """Minibatch SGD with L2 and optional (Nesterov) momentum.

    Each step reads every weight, gradient and velocity once: it is bound by memory, not
    arithmetic. `update` is the rule in NumPy; kernels.sgd_update does the same in one pass
    over memory on the calling core, bit for bit, and runs instead when Numba loads.
    """

    def __init__(self, params, momentum=0.0, nesterov=False, reg=0.0):
        self.momentum, self.nesterov = momentum, nesterov
        self.reg = {name: reg if name in REGULARIZED else 0.0 for name in params}
        self.velocity = {k: np.zeros_like(p) for k, p in params.items()} if momentum else {}

    def state(self):
        return {f"velocity_{k}": v for k, v in self.velocity.items()}

    def load_state(self, state):
        for k, v in self.velocity.items():
            v[...] = state[f"velocity_{k}"]

    def step(self, params, grads, lr):
        """p -= lr * (g + reg * p), through the momentum buffer when there is one."""
        update = kernels.sgd_update if kernels.enabled() else self.update
        for name, p in params.items():
            v, g = self.velocity.get(name, p[:0]), grads[name]  # v of size 0: no momentum
            if g.shape != p.shape or v.size not in (0, p.size):  # the kernel does not check
                raise ValueError(f"{name}: gradient {g.shape} or velocity {v.shape} is not "
                                 f"of the parameter's shape {p.shape}")
            scalars = (p.dtype.type(x) for x in (lr, self.momentum, self.reg[name]))
            # Flat views: parameters, gradients and velocities are contiguous.
            update(p.reshape(-1), g.reshape(-1), v.reshape(-1), *scalars, self.nesterov)

    @staticmethod
    def update(p, g, v, lr, momentum, reg, nesterov):
        """One step of p (and of its velocity v, unless v is empty), computed in g."""
        g += reg * p
        g *= lr
        if not v.size:
            p -= g
            return
        v *= momentum
        v -= g
        if nesterov:  # look ahead: p += momentum * v_new - lr * g
            p -= g
            p += momentum * v
        else:
            p += v
