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

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

HISTORY = 5  # L-BFGS curvature pairs kept (the preconditioner carries most of the curvature)
STEP_LADDER = np.asarray([1, 1 / 4, 1 / 16, 1 / 128], np.float32)  # step lengths tried at once
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


ABSENT = -1e30  # the intercept of a class with no labelled point: probability 0


def preconditioner(xe_NxE, curvature_N, C: float):
    """[E, E] inverse of I + C xe^T diag(curvature) xe: the Hessian of the objective with each point's
    [C, C] block diag(p) - p p^T replaced by a scalar, the same for every class (so one matrix serves
    all of them), and the intercept's regularisation by 1. By Cholesky of the [E, E] matrix, or, when
    there are fewer points than features, of the [N, N] one (Woodbury)."""
    n, e = xe_NxE.shape
    eye = functools.partial(jnp.eye, dtype=xe_NxE.dtype)
    if e <= n:
        a = eye(e) + C * jnp.einsum("ne,n,nf->ef", xe_NxE, curvature_N, xe_NxE)
        inv_l = jax.lax.linalg.triangular_solve(jnp.linalg.cholesky(a), eye(e), left_side=True, lower=True)
        return inv_l.T @ inv_l
    u = jnp.sqrt(C * curvature_N)[:, None] * xe_NxE
    inv_l = jax.lax.linalg.triangular_solve(jnp.linalg.cholesky(eye(n) + u @ u.T), u, left_side=True, lower=True)
    return eye(e) - inv_l.T @ inv_l


def _direction(g, S_MxP, Y_MxP, rho_M, gamma, precondition):
    """-H g by the two-loop recursion over the history (oldest first; empty slots have rho = 0) with the
    initial inverse Hessian gamma x the preconditioner (Nocedal & Wright, algorithm 7.4)."""
    q, alphas = g, []
    for i in reversed(range(S_MxP.shape[0])):
        a = rho_M[i] * (S_MxP[i] @ q)
        q = q - a * Y_MxP[i]
        alphas.append(a)
    r = gamma * precondition(q)
    for i, a in enumerate(reversed(alphas)):
        r = r + (a - rho_M[i] * (Y_MxP[i] @ r)) * S_MxP[i]
    return -r


def _ladder_losses(z_CxN, zd_CxN, t_T, onehot_CxN, weight_N, C):
    """[T] C x the weighted cross-entropy at the logits z + t zd, for every t of the ladder.

    The log-sum-exp over the classes is shifted by max z + t max zd, a bound on the largest logit that
    needs no reduction per t; exp(<= 0) cannot overflow, and a point whose every class underflows (the
    bound 87 above them: a step far too long) makes that t infinite, i.e. rejected."""
    shift_TxN = z_CxN.max(0) + t_T[:, None] * zd_CxN.max(0)
    sums_TxN = jnp.sum(jnp.exp(z_CxN + t_T[:, None, None] * zd_CxN - shift_TxN[:, None, :]), axis=1)
    picked_TxN = jnp.sum(z_CxN * onehot_CxN, 0) + t_T[:, None] * jnp.sum(zd_CxN * onehot_CxN, 0)
    ce_TxN = shift_TxN + jnp.log(jnp.maximum(sums_TxN, 1e-37)) - picked_TxN
    underflow = jnp.any((sums_TxN < 1e-37) & (weight_N > 0), axis=1)
    return jnp.where(underflow, jnp.inf, C * (ce_TxN @ weight_N))


class _Problem(NamedTuple):
    """One fit's data, in the layout the steps use: parameters theta [C x E] (E = D + 1: the intercept is a
    constant feature), logits [C, N] (the points on the minor axis, where XLA:CPU vectorises the ladder's
    log-sum-exp over the classes)."""

    xe_NxE: jax.Array
    onehot_CxN: jax.Array
    weight_N: jax.Array
    live_Cx1: jax.Array  # 1 for the classes with a labelled point
    offset_Cx1: jax.Array  # 0, or ABSENT for the others
    reg_E: jax.Array  # 1 on the weights, 0 on the intercept (not penalised)
    C: float
    P_ExE: jax.Array  # the preconditioner

    def forward(self, theta):
        c, e = self.onehot_CxN.shape[0], self.xe_NxE.shape[1]
        return jnp.einsum("ce,ne->cn", theta.reshape(c, e), self.xe_NxE)

    def grad_at(self, theta, z_CxN):
        r = self.C * self.weight_N * (jax.nn.softmax(z_CxN, axis=0) - self.onehot_CxN)
        return ((theta.reshape(self.live_Cx1.shape[0], -1) * self.reg_E + r @ self.xe_NxE) * self.live_Cx1).reshape(-1)

    def precondition(self, v):
        return (v.reshape(self.live_Cx1.shape[0], -1) @ self.P_ExE).reshape(-1)

    def penalty_weights(self, theta):
        return theta * jnp.tile(self.reg_E, self.live_Cx1.shape[0])


def _problem(model: Logistic, x_NxD, y_N, weight_N, C: float) -> tuple[_Problem, jax.Array, jax.Array]:
    """(the fit's problem, the starting parameters theta, their logits)."""
    d, c = model.W.shape
    dtype = x_NxD.dtype
    onehot_CxN = jax.nn.one_hot(y_N, c, dtype=dtype, axis=0)
    weight_N = weight_N.astype(dtype)
    xe_NxE = jnp.concatenate([x_NxD, jnp.ones_like(x_NxD[:, :1])], axis=1)
    present_C = (onehot_CxN @ weight_N) > 0
    live_Cx1 = present_C[:, None].astype(dtype)
    offset_Cx1 = jnp.where(present_C, 0.0, ABSENT)[:, None]
    reg_E = (jnp.arange(d + 1) < d).astype(dtype)
    start = jnp.concatenate([model.W.T, jnp.where(model.b <= ABSENT / 2, 0.0, model.b)[:, None]], axis=1)
    theta = (start * live_Cx1).reshape(-1)
    z = jnp.einsum("ce,ne->cn", theta.reshape(c, d + 1), xe_NxE) + offset_Cx1
    probs = jax.nn.softmax(z, axis=0)
    P_ExE = preconditioner(xe_NxE, weight_N * jnp.max(probs * (1 - probs), axis=0), C)
    return _Problem(xe_NxE, onehot_CxN, weight_N, live_Cx1, offset_Cx1, reg_E, C, P_ExE), theta, z


def _lbfgs_step(pb: _Problem, bar, carry):
    """One preconditioned L-BFGS step with the ladder line search (see `fit`)."""
    k, _, theta, z, value, grad, S, Y, rho, gamma = carry
    direction = _direction(grad, S, Y, rho, gamma, pb.precondition)
    slope = grad @ direction
    ok_dir = slope < 0
    direction = jnp.where(ok_dir, direction, -pb.precondition(grad))
    slope = jnp.where(ok_dir, slope, grad @ direction)
    zd = pb.forward(direction)
    t = jnp.asarray(STEP_LADDER)
    w, wd = pb.penalty_weights(theta), pb.penalty_weights(direction)
    penalty = 0.5 * (w @ w + 2 * t * (w @ wd) + t * t * (wd @ wd))
    values = penalty + _ladder_losses(z, zd, t, pb.onehot_CxN, pb.weight_N, pb.C)
    ok = values <= value + ARMIJO * t * slope
    moved = jnp.any(ok)
    pick = jnp.argmax(ok)
    step_len = jnp.where(moved, t[pick], 0.0)
    new, z = theta + step_len * direction, z + step_len * zd
    new_value = jnp.where(moved, values[pick], value)
    new_grad = pb.grad_at(new, z)
    s, y = new - theta, new_grad - grad
    sy, yPy = s @ y, y @ pb.precondition(y)
    keep = (sy > 1e-10) & (yPy > 0)  # curvature pairs that keep the inverse Hessian positive definite
    S = jnp.where(keep, jnp.concatenate([S[1:], s[None]]), S)
    Y = jnp.where(keep, jnp.concatenate([Y[1:], y[None]]), Y)
    rho = jnp.where(keep, jnp.concatenate([rho[1:], (1.0 / jnp.where(keep, sy, 1.0))[None]]), rho)
    gamma = jnp.where(keep, sy / jnp.where(keep, yPy, 1.0), gamma)
    # No decrease along the whole ladder: forget the history (the next step is the preconditioned gradient)
    S, Y, rho = (jnp.where(moved, a, 0.0) for a in (S, Y, rho))
    gamma = jnp.where(moved, gamma, 1.0)
    return k + 1, jnp.max(jnp.abs(new_grad)) <= bar, new, z, new_value, new_grad, S, Y, rho, gamma


def fit(model: Logistic, x_NxD, y_N, weight_N, steps: int = 60, C: float = 1.0, tol: float = 0.0) -> Logistic:
    """Up to `steps` preconditioned L-BFGS steps from `model` (module docstring: a fixed ladder of step
    lengths for the line search), fewer once max |gradient| <= tol x C x sum(weight): scikit-learn's
    lbfgs stopping rule (its `tol` on the gradient of the objective divided by C x the weight). Under
    vmap each fit stops where it converges (vmap of a while loop keeps a finished fit's carry while the
    others go on), so a fit's result does not depend on the fits beside it. A step whose ladder finds no
    sufficient decrease leaves the parameters where they are and restarts from the preconditioned
    gradient.

    As scikit-learn, which fits only the classes it sees, a class without a labelled (weight > 0) point
    takes no part: its weights are 0 and its intercept ABSENT (probability 0); left free, its intercept's
    optimum would be -infinity, approached one unit per step. A class absent from `model` starts at 0.

    The initial inverse Hessian of each step is a fixed matrix (`preconditioner`, from the curvature at
    the starting point: max_c p_c (1 - p_c) per point) scaled by s.y / y.P.y of the newest pair: on the
    early rounds' few, nearly separable points an identity-scaled L-BFGS needs several times the steps.

    Gradients by hand, and the line search along the logits: z(t) = z + t (x Wd + bd) and
    ||W + t Wd||^2 are known for every t from one matmul, so a step costs two [N, E] x [E, C] matmuls."""
    d, c = model.W.shape
    pb, theta, z = _problem(model, x_NxD, y_N, weight_N, C)
    bar = tol * C * jnp.sum(pb.weight_N)
    probs = jax.nn.softmax(z, axis=0)
    w = pb.penalty_weights(theta)
    value = 0.5 * (w @ w) - C * jnp.sum(jnp.log(jnp.maximum(probs, 1e-37)) * pb.onehot_CxN * pb.weight_N)
    zeros = jnp.zeros((HISTORY, theta.shape[0]), theta.dtype)
    grad = pb.grad_at(theta, z)
    init = (jnp.zeros((), jnp.int32), jnp.max(jnp.abs(grad)) <= bar, theta, z, value, grad, zeros, zeros,
            jnp.zeros((HISTORY,), theta.dtype), jnp.ones((), theta.dtype))
    _, _, theta, *_ = jax.lax.while_loop(lambda carry: (carry[0] < steps) & ~carry[1],
                                         functools.partial(_lbfgs_step, pb, bar), init)
    T = theta.reshape(c, d + 1)
    return Logistic(T[:, :d].T, T[:, d] + pb.offset_Cx1[:, 0])


def predict_proba(model: Logistic, x_NxD):
    return jax.nn.softmax(logits(model, x_NxD), axis=-1)
