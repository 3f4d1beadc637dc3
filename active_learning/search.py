"""The search for rare classes (module docstring of `active_learning.strategies`): labels drawn from each
class's exemplar proposal (egal, egal_thompson) or nearest its exemplar with epsilon-greedy exploration
(egal_eps), and the frequency bounds that take a class out of the search.

Notation: N pool points, C classes, B draws of a block.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from active_learning.bounds import bernstein, kl_bounds
from active_learning.draws import best_unlabeled, draw, random_unlabeled
from active_learning.state import Pool, Settings, State, found, label, split_key, where

# Random numbers are drawn a round at a time (`search_round`) and handed to the per-label steps: every call
# of the threefry generator is a loop of its own on XLA:CPU, so one call per draw would dominate a run.
DRAW_BLOCK = 8  # proposal draws made at once per search label; more, a block at a time, only if all hit labelled points


def search_importance(state: State, pool: Pool, c, settings: Settings, u, key) -> State:
    """One label from class c's proposal: draws x ~ p_c until one is unlabelled, every draw (the
    labelled ones too) feeding the importance statistics. u: DRAW_BLOCK + 1 uniforms (the first block
    of draws; the fallback pick after max_draws); key: for further blocks."""
    n = pool.x.shape[0]
    classes = jnp.arange(pool.p.shape[0])
    cdf = pool.cdf[c]
    slots = jnp.arange(DRAW_BLOCK)

    def block(u_B, drawn):
        """DRAW_BLOCK draws in order, up to and including the first unlabelled one (and max_draws)."""
        s_B = draw(cdf, u_B)
        allowed = slots < settings.max_draws - drawn
        free = ~state.labeled[s_B] & allowed
        hit = jnp.any(free)
        used = allowed & (slots <= jnp.where(hit, jnp.argmax(free), DRAW_BLOCK))
        z_BxC = jnp.where(used[:, None] & (pool.y[s_B][:, None] == classes),
                          1.0 / (n * pool.p[c, s_B] * pool.max_weight)[:, None], 0.0)  # in [0, 1]
        return hit, s_B[jnp.argmax(free)], z_BxC.sum(0), (z_BxC * z_BxC).sum(0), jnp.sum(used)

    def cond(carry):
        return ~carry[1] & (carry[5] < settings.max_draws)

    def body(carry):
        i, _, _, z_sum, z_sq, drawn = carry
        hit, s, z, zz, m = block(jax.random.uniform(jax.random.fold_in(key, i), (DRAW_BLOCK,)), drawn)
        return i + 1, hit, s, z_sum + z, z_sq + zz, drawn + m

    hit, s, z, zz, m = block(u[:DRAW_BLOCK], 0)
    init = (jnp.ones((), jnp.int32), hit, s, z, zz, m)
    _, hit, s, z, zz, m = jax.lax.while_loop(cond, body, init)
    s = jnp.where(hit, s, random_unlabeled(state.labeled, u[DRAW_BLOCK]))
    return label(state._replace(z_sum=state.z_sum + z, z_sq=state.z_sq + zz,
                                n_draws=state.n_draws + m.astype(jnp.float32)), s)


def search_epsilon_greedy(state: State, pool: Pool, c, settings: Settings, u, key=None) -> State:
    """One label: a uniformly random unlabelled point with probability epsilon (its class feeds the
    frequency bounds), else the unlabelled point nearest class c's exemplar. u: two uniforms."""
    explore = u[0] < settings.epsilon
    s = jnp.where(explore, random_unlabeled(state.labeled, u[1]), best_unlabeled(state.labeled, -pool.d[c], u[1]))
    onehot = (pool.y[s] == jnp.arange(pool.p.shape[0])).astype(jnp.float32)
    state = state._replace(r_sum=state.r_sum + jnp.where(explore, onehot, 0.0),
                           r_n=state.r_n + explore.astype(jnp.float32))
    return label(state, s)


def update_search(state: State, pool: Pool, settings: Settings, method: str) -> State:
    """Classes leave the search once found, or once their frequency bounds clear the threshold (for
    egal_nostop, only once found)."""
    if method == "egal_nostop":  # the ablation: no bounds
        return state._replace(in_search=state.in_search & ~found(state, pool))
    if method == "egal_eps":
        lo, hi = kl_bounds(state.r_sum / jnp.maximum(state.r_n, 1.0), state.r_n, 1.0 / (1.0 + state.r_n))
        ready = state.r_n > 0
    else:
        n = state.n_draws
        lo, hi = bernstein(state.z_sum, state.z_sq, n, 1.0 / jnp.maximum(n, 2.0))
        lo, hi = lo * pool.max_weight, hi * pool.max_weight
        ready = n >= 2
    resolved = ready & ((lo > settings.threshold) | (hi < settings.threshold))
    return state._replace(in_search=state.in_search & ~resolved & ~found(state, pool))


def search_round(state: State, pool: Pool, settings: Settings, method: str) -> State:
    """Each class still in the search (in random order) gets batch // C search labels; bounds are
    updated after each class. Nothing happens once no class is in the search."""
    c = pool.p.shape[0]
    quota = settings.batch // c
    search = search_epsilon_greedy if method == "egal_eps" else search_importance
    state, key = split_key(state)
    k_order, k_u, k_keys = jax.random.split(key, 3)
    order = jnp.argsort(jax.random.uniform(k_order, (c,)))  # the classes in random order
    u = jax.random.uniform(k_u, (c, quota, DRAW_BLOCK + 1))
    keys = jax.random.split(k_keys, c * quota).reshape((c, quota) + k_keys.shape)

    def per_class(state, xs):
        cls, u_Q, keys_Q = xs
        active = state.in_search[cls]

        def one(state, xs):
            return where(active, search(state, pool, cls, settings, *xs), state), None

        state, _ = jax.lax.scan(one, state, (u_Q, keys_Q))
        return where(active, update_search(state, pool, settings, method), state), None

    state, _ = jax.lax.scan(per_class, state, (order, u, keys))
    return state
