"""Context parallelism (the token dimension split over the `context` mesh axis) equals one device: the conv
halo, the scan carry and attention over gathered keys at slice boundaries inside documents and exactly at a
document start, values and gradients; a packed batch's loss and gradients on three meshes; bad meshes refused
before anything compiles. Each check runs on 8 virtual devices in tests/context_worker.py. The whole training
loop on context=8 is in test_sharding.py."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "context_worker.py")


def run_worker(what: str):
    out = subprocess.run([sys.executable, WORKER, what], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads([x for x in out.stdout.splitlines() if x.startswith("RESULT ")][-1][len("RESULT "):])


def test_halo_carry_and_gathered_attention_equal_one_device():
    """Float32, relative to each output's or gradient's largest value."""
    result = run_worker("ops")
    assert set(result) == {f"scan_{c}{s}" for c in ("rescan", "correction") for s in ("", "_fresh")} | {
        "conv", "conv_fresh"} | {f"attention_{m}{s}" for m in ("causal", "bidirectional") for s in ("", "_tensor")}
    for name, err in result.items():
        assert err < 1e-5, (name, err)


def test_packed_loss_and_gradients_on_context_meshes_equal_one_device():
    result = run_worker("model")
    for mesh, split in (("context8", "P(None, 'context')"), ("context2xexpert4", "P('expert', 'context')"),
                        ("context4xfsdp2", "P('fsdp', 'context')")):
        r = result[mesh]
        assert r["ids_split"] == split, r  # each device holds its slice of its rows
        assert r["loss"] < 1e-5 and r["grads"] < 1e-5, (mesh, r)
        assert r["collective_permute"] and r["all_gather"], r  # the halo's ppermute, the keys' gather


def test_bad_context_meshes_are_refused_in_one_line_before_compiling():
    not_split, too_short = run_worker("refuse")
    assert not_split == ("config.seq_len=36 does not split into the 8 slices of config.mesh.context; use a multiple "
                         "of 8 [0 compilations]")
    assert too_short.startswith("config.seq_len=16 over 8 context slices leaves 2 tokens a slice, shorter than the "
                                "Mamba conv's halo (3)") and too_short.endswith("[0 compilations]")


def test_the_context_parallel_train_step_lowers_for_gpu_with_the_kernels_in_the_shard_maps():
    """bf16, scan_impl and attention_impl "auto" under target_platform("gpu"): every Mamba layer runs the Triton
    scan kernel forward and backward twice (the carry's first pass from zeros and the rescan), every attention
    layer the flash-attention forward kernel over the gathered keys."""
    r = run_worker("lower")
    assert r["attention_layers"] and r["mamba_layers"]
    assert r["kernel_calls"] == 4 * r["mamba_layers"] + r["attention_layers"], r
    assert r["all_gather"] and r["collective_permute"], r
