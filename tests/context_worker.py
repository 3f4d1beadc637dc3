"""Context parallelism on 8 virtual CPU devices, for tests/test_context_parallel.py (JAX reads XLA_FLAGS once, so
the mesh needs its own process).

  python tests/context_worker.py ops      the conv halo, the scan carry (both carries) and attention over
                                          gathered keys against one device, values and gradients
  python tests/context_worker.py model [LENGTH]
                                          loss and gradients of a packed batch (8 rows of LENGTH tokens, default
                                          256) on three context meshes
  python tests/context_worker.py refuse   bad meshes refused in one line before anything compiles
  python tests/context_worker.py lower    the bf16 train step on context=8 lowered for GPU: kernel calls

Prints "RESULT {json}" (the largest differences against one device, or the refusal messages).
"""

import json
import os
import re
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
# XLA:CPU runs every virtual device's work on one shared thread pool (8 threads on this 2-core VM); devices that
# wait at a collective hold their threads, so under context parallelism (the last slice has the most causal
# attention work, the first ones run ahead) the pool must outnumber the waiters or the last devices starve
os.environ.setdefault("PJRT_NPROC", "32")
sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from common.attention import AttentionMask, attention, blockwise  # noqa: E402
from common.sharding import DEFAULT_RULES, make_mesh, sharding_context  # noqa: E402
from jamba_jax.sequence_ops import CARRIES, sharded_causal_conv, sharded_selective_scan  # noqa: E402


def max_diff(a, b) -> float:
    """The largest difference between two trees, each leaf's relative to its largest value (at least 1)."""
    return max(float(jnp.max(jnp.abs(x - y)) / jnp.maximum(jnp.max(jnp.abs(y)), 1.0))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def on_mesh(fn, mesh_cfg, *args):
    """fn(*args) jitted on one device and on the mesh: (one device's result, the mesh's)."""
    ref = jax.jit(fn)(*args)
    with sharding_context(make_mesh(mesh_cfg), DEFAULT_RULES):
        return ref, jax.jit(fn)(*args)


def value_and_grads(fn, argnums):
    """fn's outputs and the gradients of a random projection of them."""
    def f(*args):
        out = fn(*args)
        return sum(jnp.sum(o * jnp.cos(jnp.arange(o.size, dtype=jnp.float32).reshape(o.shape))) for o in out)
    return lambda *args: (fn(*args), jax.grad(f, argnums)(*args))


def ops() -> dict:
    b, L, d, n, w = 2, 64, 16, 4, 4  # 8 slices of 8 tokens
    k = jax.random.split(jax.random.PRNGKey(0), 12)
    # documents start inside a slice (19), exactly at a slice start (24) and inside a halo (17: slice 2's first
    # inputs reach back into document 1); row 1 is one document
    seg = np.ones((b, L), np.int32)
    seg[0, 17:] = 2
    seg[0, 19:] = 3
    seg[0, 24:] = 4
    reset = np.concatenate([np.ones((b, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    args = dict(u=jax.random.normal(k[0], (b, L, d)), delta=jax.random.normal(k[1], (b, L, d)),
                A=-jnp.exp(jax.random.normal(k[2], (d, n))), B=jax.random.normal(k[3], (b, L, n)),
                C=jax.random.normal(k[4], (b, L, n)), D=jax.random.normal(k[5], (d,)),
                z=jax.random.normal(k[6], (b, L, d)),
                delta_bias=jax.random.normal(k[7], (d,)), initial_state=jax.random.normal(k[8], (b, d, n)))
    out = {}
    for carry in CARRIES:
        fn = value_and_grads(lambda a, r, c=carry: sharded_selective_scan({**a, "reset": r}, "scan", c), 0)
        out[f"scan_{carry}"] = max_diff(*on_mesh(fn, {"context": 8}, args, jnp.asarray(reset)))
        fn = value_and_grads(lambda a, r, c=carry: sharded_selective_scan({**a, "initial_state": None, "reset": r},
                                                                          "scan", c), 0)
        out[f"scan_{carry}_fresh"] = max_diff(*on_mesh(fn, {"context": 4, "tensor": 2}, args, jnp.asarray(reset)))
    x, kern, bias, state = (jax.random.normal(k[9], (b, L, d)), jax.random.normal(k[10], (w, d)),
                            jax.random.normal(k[11], (d,)), jax.random.normal(k[8], (b, w - 1, d)))
    conv = value_and_grads(lambda x, kern, bias, state, seg: sharded_causal_conv(x, kern, bias, state, seg),
                           (0, 1, 2, 3))
    out["conv"] = max_diff(*on_mesh(conv, {"context": 8}, x, kern, bias, state, jnp.asarray(seg)))
    conv = value_and_grads(lambda x, kern: sharded_causal_conv(x, kern), (0, 1))
    out["conv_fresh"] = max_diff(*on_mesh(conv, {"context": 2, "data": 2, "tensor": 2}, x, kern))
    # attention: blocks of 8 so the causal loops skip key blocks across slices; padding at the start of row 1
    blockwise.BLOCK_Q, blockwise.BLOCK_K = 8, 8
    h, g, hd = 2, 2, 8
    q = jax.random.normal(k[0], (b, L, h, g, hd))
    kk, v = jax.random.normal(k[1], (b, h, L, hd)), jax.random.normal(k[2], (b, h, L, hd))
    valid = jnp.ones((b, L), bool).at[1, :5].set(False)
    attend = value_and_grads(lambda q, kk, v, m: (attention(q, kk, v, m, impl="blockwise"),), (0, 1, 2))
    for name, mask in (("causal", AttentionMask.causal(valid, jnp.asarray(seg))),
                       ("bidirectional", AttentionMask.bidirectional(valid))):
        out[f"attention_{name}"] = max_diff(*on_mesh(attend, {"context": 8}, q, kk, v, mask))
        out[f"attention_{name}_tensor"] = max_diff(*on_mesh(attend, {"context": 4, "tensor": 2}, q, kk, v, mask))
    return out


def model(length: int = 256) -> dict:
    from common.sharding import batch_sharding, put_batch, tree_shardings
    from jamba_jax import JambaConfig, JambaForCausalLM, init_params
    from jamba_jax.losses import target_weights
    from jamba_jax.params import param_logical_specs

    cfg = JambaConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, num_experts=4, attn_layer_period=2, attn_layer_offset=1, mamba_d_state=8)
    params = init_params(cfg, jax.random.PRNGKey(1))
    b, L = 8, length
    rng = np.random.RandomState(0)
    ids = rng.randint(0, cfg.vocab_size, (b, L)).astype(np.int32)
    seg = np.cumsum(rng.rand(b, L) < 8 / L, axis=1).astype(np.int32) + 1  # about 8 packed documents a row
    seg[:, L - 7:] = 0  # padding at the end
    seg[0, L // 2:] = 9  # a document starting exactly at a slice boundary of every mesh below
    lm = JambaForCausalLM(cfg)

    def loss(p, ids, seg):
        out = lm.apply({"params": p}, ids, jnp.pad(ids[:, 1:], [(0, 0), (0, 1)]), None, seg, method="token_nll")
        w = target_weights(ids, None, seg)
        return jnp.sum(out.token_nll[:, :-1] * w) / jnp.sum(w) + 0.01 * out.aux_loss

    ref_loss, ref_grads = jax.jit(jax.value_and_grad(loss))(params, ids, seg)
    out = {"loss": float(ref_loss)}
    for mesh_cfg in ({"context": 8}, {"context": 2, "expert": 4}, {"context": 4, "fsdp": 2}):
        mesh = make_mesh(mesh_cfg)
        with sharding_context(mesh, DEFAULT_RULES):
            p = jax.device_put(params, tree_shardings(params, param_logical_specs(cfg), mesh, DEFAULT_RULES))
            batch = put_batch({"ids": ids, "seg": seg}, batch_sharding(mesh, DEFAULT_RULES))
            fn = jax.jit(jax.value_and_grad(loss))
            hlo = fn.lower(p, batch["ids"], batch["seg"]).compile().as_text()
            value, grads = fn(p, batch["ids"], batch["seg"])
        name = "x".join(f"{k}{v}" for k, v in mesh_cfg.items())
        out[name] = {"loss": abs(float(value) - float(ref_loss)) / abs(float(ref_loss)),
                     "grads": max_diff(grads, ref_grads), "ids_split": str(batch["ids"].sharding.spec),
                     "collective_permute": "collective-permute" in hlo, "all_gather": "all-gather" in hlo}
    return out


def refuse() -> list[str]:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_training import small_config

    from common.errors import UserError
    from tasks.jamba_lm import JambaLMTask
    from training import train

    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, *a, **kw: compiles.append(name) if "backend_compile" in name else None)
    messages = []
    for seq_len, context in ((36, 8), (16, 8)):  # 36 tokens do not split in 8; 2 tokens a slice < the halo of 3
        config = small_config(seq_len=seq_len, num_train_steps=1)
        config.mesh.data, config.mesh.context = 1, context
        task = JambaLMTask(config)
        compiles.clear()  # (building the task counts its parameters from a PRNG key)
        try:
            train.run(task, config, f"/tmp/context-refuse-{os.getpid()}-{seq_len}")
            messages.append("not refused")
        except UserError as e:
            messages.append(str(e))
        messages[-1] += f" [{len(compiles)} compilations]"
    return messages


def lower() -> dict:
    """The tiny config's bf16 train step on context=8 lowered for a GPU (Triton kernels inside the shard_maps):
    how many kernel calls, and the layer counts to expect them from. (Lowering Mosaic TPU kernels under a mesh of
    CPU devices fails in jax itself: it asks the mesh's devices for their TPU generation.)"""
    from configs import jamba_tiny
    from kernels import target_platform
    from tasks.jamba_lm import JambaLMTask
    from training.optim import make_optimizer
    from training.step import init_state, make_train_step

    config = jamba_tiny.get_config()
    config.dry_run, config.model.dtype = True, "bfloat16"
    task, optimizer = JambaLMTask(config), make_optimizer(config)
    state = jax.eval_shape(lambda r: init_state(task, optimizer, r), jax.random.PRNGKey(0))
    batch = {k: jax.ShapeDtypeStruct((2, 1024), jnp.int32) for k in ("inputs", "segment_ids")}
    with target_platform("gpu"), sharding_context(make_mesh({"data": 1, "context": 8}), DEFAULT_RULES):
        text = jax.jit(make_train_step(task, optimizer, 1)).trace(state, batch).lower(
            lowering_platforms=("cuda",)).as_text()
    attention = sum(task.cfg.is_attention_layer(i) for i in range(task.cfg.num_hidden_layers))
    return {"kernel_calls": len(re.findall(r"__gpu\$xla\.gpu\.triton|mosaic_gpu", text)), "attention_layers": attention,
            "mamba_layers": task.cfg.num_hidden_layers - attention, "all_gather": "all_gather" in text,
            "collective_permute": "collective_permute" in text}


if __name__ == "__main__":
    what = {"ops": ops, "model": model, "refuse": refuse, "lower": lower}[sys.argv[1]]
    print("RESULT " + json.dumps(what(*map(int, sys.argv[2:]))), flush=True)
