"""Meshes: mesh and rule resolution here; training on 8 virtual CPU devices (each mesh in its own
process, as JAX reads XLA_FLAGS once) against one device: same losses, same final parameters,
a checkpoint restored onto another mesh, and a 2-process run (gloo on loopback)."""

import json
import os
import socket
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from common.sharding import DEFAULT_RULES, MeshError, mesh_axes, mesh_shape, rules_from_config
from jamba_jax import JambaConfig, init_params, load_checkpoint, quantize_experts_int8
from jamba_jax.params import param_logical_specs

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mesh_worker.py")
ROOT = os.path.dirname(os.path.dirname(WORKER))


def test_mesh_shape_fills_the_rest_and_names_bad_sizes():
    assert mesh_shape({"data": -1, "expert": 4}, 8) == {"data": 2, "fsdp": 1, "context": 1, "expert": 4, "tensor": 1}
    assert mesh_shape({"data": 2, "fsdp": 2, "expert": 2, "tensor": 1}, 8)["fsdp"] == 2
    with pytest.raises(MeshError, match="spans 4 devices, but there are 8"):
        mesh_shape({"data": 4, "fsdp": 1}, 8)
    with pytest.raises(MeshError, match="do not divide"):
        mesh_shape({"data": -1, "expert": 3}, 8)
    with pytest.raises(MeshError, match="at most one -1"):
        mesh_shape({"data": -1, "fsdp": -1}, 8)
    with pytest.raises(MeshError, match="unknown axes"):
        mesh_shape({"model": 2}, 8)


def test_rules_resolve_each_mesh_axis_once_and_accept_overrides():
    with nn.logical_axis_rules(DEFAULT_RULES):
        assert mesh_axes(("exp", "embed", "mlp")) == (("expert",), ("fsdp", "context"), ("tensor",))
        assert mesh_axes(("vocab", "embed")) == (("tensor",), ("fsdp", "expert", "context"))
        # activations: rows over the batch axes, tokens over context, Mamba channels over what is left
        assert mesh_axes(("batch", "length", "mamba_inner")) == (("data", "fsdp", "expert"), ("context",),
                                                                 ("tensor",))
    rules = dict(rules_from_config({"rules": {"vocab": None, "mlp": ["tensor", "fsdp"]}}))
    assert rules["vocab"] is None and rules["mlp"] == ("tensor", "fsdp") and rules["exp"] == "expert"
    with pytest.raises(MeshError, match="names mesh axis 'model'"):
        rules_from_config({"rules": {"vocab": "model"}})


def test_quantized_scales_shard_with_their_weights():
    cfg = JambaConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, num_experts=4, attn_layer_period=2, attn_layer_offset=0,
                      mamba_d_state=4)
    q = quantize_experts_int8(cfg, init_params(cfg, jax.random.PRNGKey(0)))
    specs = param_logical_specs(cfg, q)
    experts, mlp = specs["model"]["layers_1"]["feed_forward"]["experts"], specs["model"]["layers_0"]["feed_forward"]
    assert experts["gate_proj"] == P("exp", "embed", "mlp") and experts["gate_proj_scale"] == P("exp", "mlp")
    assert experts["down_proj_scale"] == P("exp", "embed")
    assert mlp["down_proj"]["kernel_scale"] == P("embed")
    assert jax.tree.structure(specs, is_leaf=lambda x: isinstance(x, P)) == jax.tree.structure(q)


# --- training across meshes (subprocesses) ---------------------------------------------------------
def run_worker(workdir, devices, mesh, *extra, processes=None):
    cmd = [sys.executable, WORKER, "--devices", str(devices), "--mesh", json.dumps(mesh), "--workdir", str(workdir),
           *extra]
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    if processes is None:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        outs = [out]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        procs = [subprocess.Popen(cmd + ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes),
                                         "--process-id", str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=env) for i in range(processes)]
        outs = []
        for p in procs:
            stdout, stderr = p.communicate(timeout=600)
            outs.append(subprocess.CompletedProcess(cmd, p.returncode, stdout, stderr))
    for o in outs:
        assert o.returncode == 0, o.stderr[-4000:]
    line = [x for x in outs[0].stdout.splitlines() if x.startswith("RESULT ")][-1]
    sample = [x for x in outs[0].stdout.splitlines() if x.startswith("greedy sample")]
    losses = {int(k): v for k, v in json.loads(line[len("RESULT "):])["losses"].items()}
    return losses, load_checkpoint(str(workdir))[1], sample


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    return run_worker(tmp_path_factory.mktemp("one"), 1, {"data": 1}, "--sample")


def assert_same_run(run, reference):
    losses, params, _ = run
    ref_losses, ref_params, _ = reference
    assert sorted(losses) == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([losses[s] for s in range(1, 6)], [ref_losses[s] for s in range(1, 6)], rtol=1e-5)
    # atol 1e-4 = 1% of one step at lr 1e-2: Adam's update m / sqrt(v) has size ~lr however small
    # the gradient, so on an embedding row whose gradient is ~1e-9 float32 reduction-order noise
    # (sums split over devices) moves the update by up to ~1e-4 over 5 steps (the embedding table: 2e-4,
    # its rows of tokens seen once or twice have such gradients); everywhere else it is 1e-7
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(ref_params), strict=True):
        atol = 2e-4 if "embed_tokens" in str(path) else 1e-4
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=atol, err_msg=str(path))


# fsdp=4 x data=2 runs steps 1-3 in test_checkpoint_restores_onto_another_mesh
# the expert meshes are slow (about 70 s each); the checkpoint test below resumes on tensor2 x expert2 x data2
MESHES = [{"data": 8}, {"context": 8}, pytest.param({"expert": 4, "data": 2}, marks=pytest.mark.slow),
          pytest.param({"tensor": 2, "expert": 2, "data": 2}, marks=pytest.mark.slow)]


@pytest.mark.parametrize("mesh", MESHES, ids=["data8", "context8", "expert4xdata2", "tensor2xexpert2xdata2"])
def test_five_steps_on_a_mesh_equal_one_device(mesh, one_device, tmp_path):
    extra = ("--sample",) if "expert" in mesh or "context" in mesh else ()
    run = run_worker(tmp_path, 8, mesh, *extra)
    assert_same_run(run, one_device)
    if extra:  # generation under the mesh: experts run with replicated tokens (batch of 1); a context mesh leaves
        assert run[2] == one_device[2] and run[2]  # the short prompt and the decode steps unsplit


def test_checkpoint_restores_onto_another_mesh(one_device, tmp_path):
    """Steps 1-3 on fsdp=4 x data=2 (checkpoint at 3), steps 4-5 resumed on tensor=2 x expert=2 x data=2."""
    first, _, _ = run_worker(tmp_path, 8, {"fsdp": 4, "data": 2}, "--stop-after", "3")
    np.testing.assert_allclose([first[s] for s in (1, 2, 3)], [one_device[0][s] for s in (1, 2, 3)], rtol=1e-5)
    assert_same_run(run_worker(tmp_path, 8, {"tensor": 2, "expert": 2, "data": 2}), one_device)


@pytest.mark.slow  # two processes compiling the same program (about 90 s)
def test_two_processes_equal_one(one_device, tmp_path):
    assert_same_run(run_worker(tmp_path, 4, {"expert": 2, "fsdp": 2, "data": 2}, processes=2), one_device)


@pytest.mark.slow  # as above
def test_a_context_group_spanning_two_processes_equals_one_device(one_device, tmp_path):
    """Both processes hold slices of the same rows: each loads the same block of rows (`row_blocks`)."""
    assert_same_run(run_worker(tmp_path, 4, {"context": 8}, processes=2), one_device)


_IN_MESH = r'''
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from jamba_jax import JambaConfig, JambaForCausalLM, generate, init_params, quantize_experts_int8
from jamba_jax.sequence_ops import sharded_selective_scan
from jamba_jax.params import param_logical_specs
from common.sharding import DEFAULT_RULES, make_mesh, sharding_context, tree_shardings

# tensor-parallel Mamba: d_inner split over tensor, batch over data; no collective in the scan
b, L, d, n = 4, 32, 16, 8
k = jax.random.split(jax.random.PRNGKey(0), 8)
args = dict(u=jax.random.normal(k[0], (b, L, d)), delta=jax.random.normal(k[1], (b, L, d)),
            A=-jnp.exp(jax.random.normal(k[2], (d, n))), B=jax.random.normal(k[3], (b, L, n)),
            C=jax.random.normal(k[4], (b, L, n)), D=jnp.ones((d,)), z=jax.random.normal(k[5], (b, L, d)),
            delta_bias=jnp.zeros((d,)), reset=jnp.zeros((b, L), bool).at[:, 9].set(True))
y_ref, h_ref = sharded_selective_scan(args, "scan")
mesh = make_mesh({"tensor": 2, "data": 4})
with sharding_context(mesh, DEFAULT_RULES):
    fn = jax.jit(lambda a: sharded_selective_scan(a, "scan"))
    hlo = fn.lower(args).compile().as_text()
    y, h = fn(args)
assert y.sharding.spec == P(("data",), None, ("tensor",)), y.sharding
colls = [c for c in ("all-reduce", "all-gather", "all-to-all", "collective-permute", "reduce-scatter") if c in hlo]
assert not colls, colls
np.testing.assert_allclose(y, y_ref, atol=1e-5)
np.testing.assert_allclose(h, h_ref, atol=1e-5)

# ExpertsInt8 under expert parallelism: int8 weights and scales sharded together, same logits
cfg = JambaConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_experts=4, attn_layer_period=2, attn_layer_offset=0, mamba_d_state=8)
q = quantize_experts_int8(cfg, init_params(cfg, jax.random.PRNGKey(1)))
ids = jax.random.randint(jax.random.PRNGKey(2), (8, 16), 0, cfg.vocab_size)
model = JambaForCausalLM(cfg)
ref = model.apply({"params": q}, ids).logits
mesh = make_mesh({"expert": 4, "data": 2})
with sharding_context(mesh, DEFAULT_RULES):
    sh = tree_shardings(q, param_logical_specs(cfg, q), mesh, DEFAULT_RULES)
    qs = jax.device_put(q, sh)
    experts = qs["model"]["layers_1"]["feed_forward"]["experts"]
    assert experts["gate_proj"].sharding.spec[0] in ("expert", ("expert",))
    assert experts["gate_proj_scale"].sharding.spec[0] in ("expert", ("expert",))
    assert experts["gate_proj"].addressable_shards[0].data.shape[0] == 1
    out = jax.jit(lambda p, i: model.apply({"params": p}, i).logits)(qs, ids)
    tokens = generate(model, qs, ids[:1, :5], max_new_tokens=6)  # one row: experts with replicated tokens
np.testing.assert_allclose(out, ref, atol=1e-4)
np.testing.assert_array_equal(tokens, generate(model, q, ids[:1, :5], max_new_tokens=6))

# scanned layers on a mesh: the stacked weights shard like the per-layer ones (repeats replicated),
# and logits and gradients equal the unrolled model's on one device
from jamba_jax.layout import to_scanned, to_unrolled
cfg = cfg.replace(num_hidden_layers=4)
scfg = cfg.replace(scan_layers=True)
p = init_params(cfg, jax.random.PRNGKey(3))
loss = lambda c: (lambda p, i: jnp.sum(JambaForCausalLM(c).apply({"params": p}, i).logits ** 2) / 1e3)
ref_out, ref_grad = jax.value_and_grad(loss(cfg))(p, ids)
mesh = make_mesh({"fsdp": 2, "expert": 2, "data": 2})
with sharding_context(mesh, DEFAULT_RULES):
    sp = jax.device_put(to_scanned(cfg, p), tree_shardings(to_scanned(cfg, p), param_logical_specs(scfg), mesh,
                                                           DEFAULT_RULES))
    gate = sp["model"]["cycles"]["layers_1"]["feed_forward"]["experts"]["gate_proj"]
    assert gate.shape[0] == 2 and gate.sharding.spec[0] is None and gate.sharding.spec[1] in ("expert", ("expert",))
    out, grad = jax.jit(jax.value_and_grad(loss(scfg)))(sp, ids)
np.testing.assert_allclose(out, ref_out, rtol=1e-5)
for a, b in zip(jax.tree.leaves(to_unrolled(cfg, grad)), jax.tree.leaves(ref_grad), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
print("OK")
'''


@pytest.mark.slow  # about 2 min of compiles on 8 host devices
def test_tensor_parallel_scan_no_communication_int8_experts_and_scanned_layers_on_meshes():
    out = subprocess.run([sys.executable, "-c", _IN_MESH], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-4000:]
