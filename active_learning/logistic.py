"""Multinomial logistic regression in JAX, the classifier every active-learning method refits after
each batch: scikit-learn's `LogisticRegression()` objective (L2 penalty 1 / (2C) ||W||^2 on the
weights, not the intercept, C = 1, summed cross-entropy), minimised by L-BFGS for a fixed number of
steps, warm-started from the previous fit. Labelled points are selected by a 0/1 weight over the
whole pool, so shapes stay static under jit and vmap.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


class Logistic(NamedTuple):
    W: jax.Array  # [D, C]
    b: jax.Array  # [C]


def init(dim: int, num_classes: int) -> Logistic:
    return Logistic(jnp.zeros((dim, num_classes), jnp.float32), jnp.zeros((num_classes,), jnp.float32))


def logits(model: Logistic, x_NxD):
    return x_NxD @ model.W + model.b


def objective(model: Logistic, x_NxD, y_N, weight_N, C: float = 1.0):
    """0.5 ||W||^2 + C sum_i weight_i CE(y_i | x_i): scikit-learn's multinomial objective."""
    logp = jax.nn.log_softmax(logits(model, x_NxD), axis=-1)
    ce = -jnp.take_along_axis(logp, y_N[:, None], axis=-1)[:, 0]
    return 0.5 * jnp.sum(model.W ** 2) + C * jnp.sum(ce * weight_N)


def fit(model: Logistic, x_NxD, y_N, weight_N, steps: int = 60, C: float = 1.0) -> Logistic:
    """`steps` L-BFGS steps (zoom line search) from `model`."""
    f = lambda m: objective(m, x_NxD, y_N, weight_N, C)  # noqa: E731
    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(f)

    def step(carry, _):
        m, state = carry
        value, grad = value_and_grad(m, state=state)
        updates, state = opt.update(grad, state, m, value=value, grad=grad, value_fn=f)
        return (optax.apply_updates(m, updates), state), None

    (model, _), _ = jax.lax.scan(step, (model, opt.init(model)), None, length=steps)
    return model


def predict_proba(model: Logistic, x_NxD):
    return jax.nn.softmax(logits(model, x_NxD), axis=-1)
