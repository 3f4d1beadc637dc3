"""AdamW with linear warmup + cosine decay, global-norm clipping, and no weight decay on norms,
biases and Mamba's A_log / D (as mamba_ssm and most LM codebases exclude them)."""

from __future__ import annotations

import jax
import optax

NO_DECAY = ("scale", "bias", "A_log", "D", "dt_proj_bias", "conv_bias")


def decay_mask(params):
    def keep(path, leaf):
        name = getattr(path[-1], "key", str(path[-1]))
        return not (name in NO_DECAY or name.endswith("_bias") or leaf.ndim < 2)

    return jax.tree_util.tree_map_with_path(keep, params)


def learning_rate_schedule(config) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.learning_rate, warmup_steps=config.warmup_steps,
        decay_steps=max(config.num_train_steps, config.warmup_steps + 1),
        end_value=config.learning_rate * config.min_lr_ratio)


def make_optimizer(config) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(config.grad_clip_norm),
        optax.adamw(learning_rate_schedule(config), b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps,
                    weight_decay=config.weight_decay, mask=decay_mask),
    )
