"""Multinomial logistic regression in JAX, the classifier every active-learning method refits after
each batch: scikit-learn's `LogisticRegression()` objective (L2 penalty 1 / (2C) ||W||^2 on the
weights, not the intercept, C = 1, summed cross-entropy), minimised by L-BFGS, warm-started from the
previous fit, for at most a given number of steps and fewer at scikit-learn's gradient tolerance.
Labelled points are selected by a 0/1 weight over the whole pool, so shapes stay static under jit and
vmap.

The L-BFGS here is written for many small fits vmapped together on a CPU, where the cost is the number of
operations, not their size: no loop inside a step. The line search tries a fixed ladder of step lengths
at once (along the logits: one matmul for all of them) and takes the longest that decreases the objective enough
(Armijo), instead of a zoom line search's while loop, which under vmap runs as long as the slowest fit
and costs dozens of tiny operations per trial.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

HISTORY = 10  # L-BFGS curvature pairs kept
STEP_LADDER = np.asarray([1, 1 / 2, 1 / 4, 1 / 16, 1 / 64, 1 / 512], np.float32)  # step lengths tried at once
ARMIJO = 1e-4  # sufficient decrease: f(x + t d) <= f(x) + ARMIJO t g.d


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


def _direction(g, S_MxP, Y_MxP, rho_M):
    """-H g by the two-loop recursion over the history (oldest first; empty slots have rho = 0), the
    initial inverse Hessian scaled by s.y / y.y of the newest pair (Nocedal & Wright, algorithm 7.4), or
    by 1 / |g| while the history is empty."""
    q, alphas = g, []
    for i in reversed(range(S_MxP.shape[0])):
        a = rho_M[i] * (S_MxP[i] @ q)
        q = q - a * Y_MxP[i]
        alphas.append(a)
    yy = Y_MxP[-1] @ Y_MxP[-1]
    first = 1.0 / jnp.maximum(jnp.sqrt(g @ g), 1e-30)  # no history yet: a step of unit length
    r = q * jnp.where(yy > 0, (S_MxP[-1] @ Y_MxP[-1]) / jnp.where(yy > 0, yy, 1.0), first)
    for i, a in enumerate(reversed(alphas)):
        r = r + (a - rho_M[i] * (Y_MxP[i] @ r)) * S_MxP[i]
    return -r


def _ladder_losses(z_CxN, zd_CxN, t_T, onehot_CxN, weight_N, C):
    """[T] C x the weighted cross-entropy at the logits z + t zd, for every t of the ladder.

    The log-sum-exp over the classes is shifted by max z + t max zd, a bound on the largest logit that
    costs no reduction per t (3-4x cheaper than a max per t on XLA:CPU); exp(<= 0) cannot overflow, and a
    point whose every class underflows (the bound 87 above them: a step far too long) makes that t
    infinite, i.e. rejected."""
    shift_TxN = z_CxN.max(0) + t_T[:, None] * zd_CxN.max(0)
    sums_TxN = jnp.sum(jnp.exp(z_CxN + t_T[:, None, None] * zd_CxN - shift_TxN[:, None, :]), axis=1)
    picked_TxN = jnp.sum(z_CxN * onehot_CxN, 0) + t_T[:, None] * jnp.sum(zd_CxN * onehot_CxN, 0)
    ce_TxN = shift_TxN + jnp.log(jnp.maximum(sums_TxN, 1e-37)) - picked_TxN
    underflow = jnp.any((sums_TxN < 1e-37) & (weight_N > 0), axis=1)
    return jnp.where(underflow, jnp.inf, C * (ce_TxN @ weight_N))


def fit(model: Logistic, x_NxD, y_N, weight_N, steps: int = 60, C: float = 1.0, tol: float = 0.0) -> Logistic:
    """Up to `steps` L-BFGS steps from `model` (module docstring: a fixed ladder of step lengths for the
    line search), fewer once max |gradient| <= tol x C x sum(weight): scikit-learn's lbfgs stopping rule
    (its `tol` on the gradient of the objective divided by C x the weight). Under vmap each fit stops
    where it converges (vmap of a while loop keeps a finished fit's carry while the others go on), so a
    fit's result does not depend on the fits beside it. A step whose ladder finds no sufficient decrease
    leaves the parameters where they are and restarts from steepest descent.

    Gradients by hand, and the line search along the logits: z(t) = z + t (x Wd + bd) and
    ||W + t Wd||^2 are known for every t from one matmul, so a step costs two [N, D] x [D, C] matmuls.
    Inside, the weights are [C, D] and the logits [C, N]: the points on the minor axis, where XLA:CPU
    vectorises the ladder's log-sum-exp over the classes (2x faster than over a minor axis of C)."""
    d, c = model.W.shape
    onehot_CxN = jax.nn.one_hot(y_N, c, dtype=x_NxD.dtype, axis=0)
    weight_N = weight_N.astype(x_NxD.dtype)

    def unflat(theta):  # -> W^T [C, D], b [C]
        return theta[: c * d].reshape(c, d), theta[c * d:]

    def forward(Wt_CxD, b_C):
        return jnp.einsum("cd,nd->cn", Wt_CxD, x_NxD) + b_C[:, None]

    def grad_at(Wt_CxD, z_CxN):
        r = C * weight_N * (jax.nn.softmax(z_CxN, axis=0) - onehot_CxN)
        return jnp.concatenate([(Wt_CxD + r @ x_NxD).reshape(-1), r.sum(1)])

    bar = tol * C * jnp.sum(weight_N)

    def converged(grad):
        return jnp.max(jnp.abs(grad)) <= bar

    def step(carry):
        k, _, theta, z, value, grad, S, Y, rho = carry
        direction = _direction(grad, S, Y, rho)
        slope = grad @ direction
        direction, slope = jnp.where(slope < 0, direction, -grad), jnp.where(slope < 0, slope, -(grad @ grad))
        W, _ = unflat(theta)
        Wd, bd = unflat(direction)
        zd = forward(Wd, bd)
        t = jnp.asarray(STEP_LADDER)
        penalty = 0.5 * (jnp.sum(W * W) + 2 * t * jnp.sum(W * Wd) + t * t * jnp.sum(Wd * Wd))
        values = penalty + _ladder_losses(z, zd, t, onehot_CxN, weight_N, C)
        ok = values <= value + ARMIJO * t * slope
        moved = jnp.any(ok)
        pick = jnp.argmax(ok)
        step_len = jnp.where(moved, t[pick], 0.0)
        new, z = theta + step_len * direction, z + step_len * zd
        new_value = jnp.where(moved, values[pick], value)
        new_grad = grad_at(unflat(new)[0], z)
        s, y = new - theta, new_grad - grad
        sy = s @ y
        keep = sy > 1e-10  # curvature pairs that keep the inverse Hessian positive definite
        S = jnp.where(keep, jnp.concatenate([S[1:], s[None]]), S)
        Y = jnp.where(keep, jnp.concatenate([Y[1:], y[None]]), Y)
        rho = jnp.where(keep, jnp.concatenate([rho[1:], (1.0 / jnp.where(keep, sy, 1.0))[None]]), rho)
        # No decrease along the whole ladder: forget the history (the next step is steepest descent)
        S, Y, rho = (jnp.where(moved, a, 0.0) for a in (S, Y, rho))
        return k + 1, converged(new_grad), new, z, new_value, new_grad, S, Y, rho

    theta = jnp.concatenate([model.W.T.reshape(-1), model.b])
    z = forward(model.W.T, model.b)
    value = objective(model, x_NxD, y_N, weight_N, C)
    zeros = jnp.zeros((HISTORY, theta.shape[0]), theta.dtype)
    grad = grad_at(model.W.T, z)
    init = (jnp.zeros((), jnp.int32), converged(grad), theta, z, value, grad, zeros, zeros,
            jnp.zeros((HISTORY,), theta.dtype))
    _, _, theta, *_ = jax.lax.while_loop(lambda carry: (carry[0] < steps) & ~carry[1], step, init)
    Wt, b = unflat(theta)
    return Logistic(Wt.T, b)


def predict_proba(model: Logistic, x_NxD):
    return jax.nn.softmax(logits(model, x_NxD), axis=-1)
