"""The benchmarks' bookkeeping: which auxiliary-tuning runs are done (a stopped benchmark resumes), where a
mean curve crosses a target, when two intervals count as apart, which ops the mfu breakdown counts, what the
long-cache decode benchmark fills and reports."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jamba_jax
from benchmarks.aux_tuning import finished
from benchmarks.aux_tuning_report import apart, reach, stats
from benchmarks.mfu import op_sources
from benchmarks.serving import fcfs_decode_steps


def _write(path, rows):
    path.mkdir()
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_a_run_is_finished_only_with_its_last_eval_row(tmp_path):
    _write(tmp_path / "done", [{"step": 0, "eval_loss": 7.0}, {"step": 10, "loss": 5.0},
                               {"step": 10, "eval_loss": 4.0}])
    _write(tmp_path / "stopped", [{"step": 0, "eval_loss": 7.0}, {"step": 10, "loss": 5.0}])
    _write(tmp_path / "longer", [{"step": 0, "eval_loss": 7.0}, {"step": 10, "eval_loss": 4.0}])
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "metrics.jsonl").write_text('{"step": 0, "eval_loss": 7.0}\n{"step": 10, "eval')
    assert finished(str(tmp_path / "done"), 10)
    assert not finished(str(tmp_path / "stopped"), 10)  # trained to the end, killed before its eval
    assert not finished(str(tmp_path / "longer"), 20)  # the same workdir asked for more steps
    assert not finished(str(tmp_path / "torn"), 10)  # a line cut by a kill
    assert not finished(str(tmp_path / "absent"), 10)


def test_reach_interpolates_the_seed_mean_between_evals():
    runs = [{"flops": [0.0, 10.0, 20.0], "perplexity": [100.0, 60.0, 40.0]},
            {"flops": [0.0, 10.0, 20.0], "perplexity": [100.0, 40.0, 20.0]}]
    # mean curve 100, 50, 30: 45 lies a quarter of the way from 50 to 30
    assert reach(runs, "perplexity", 45.0) == pytest.approx(12.5)
    assert reach(runs, "perplexity", 50.0) == pytest.approx(10.0)
    assert reach(runs, "perplexity", 100.0) == 0.0
    assert np.isnan(reach(runs, "perplexity", 29.0))


def test_intervals_are_apart_only_with_an_interval_on_both_sides():
    a, b = stats([1.0, 1.1, 0.9]), stats([2.0, 2.1, 1.9])
    assert a[0] == pytest.approx(1.0) and a[1] == pytest.approx(0.1 / np.sqrt(3))
    assert a[2] == pytest.approx(a[1] * 4.302653, rel=1e-5)  # Student t, 2 degrees of freedom
    assert apart(a, b) and apart(b, a)
    assert not apart(a, stats([1.2, 1.3, 1.1]))  # 1 + 0.248 > 1.2 - 0.248
    assert not apart(stats([1.0]), stats([5.0]))  # one seed: no interval, no claim


def test_first_come_first_served_decode_steps():
    """Each request takes the first slot to free: 2 slots, outputs 5, 1, 1, 1, 4 -> slot B runs 1, 1, 1 (ends at
    3) and then 4 (ends at 7); slot A's 5 ends first."""
    assert fcfs_decode_steps([5, 1, 1, 1, 4], 2) == 7
    assert fcfs_decode_steps([3, 3, 3], 3) == 3 and fcfs_decode_steps([3, 3, 3], 1) == 9
    from benchmarks.serving import workload

    assert fcfs_decode_steps(workload(64)[1], 8) == 522  # the figure README.md quotes


def test_the_mfu_breakdown_counts_a_loops_body_ops_and_not_the_loop():
    """A while loop's trace event spans its body's: counting both counted the body twice (the 11.6M model's train
    step summed to 1.6x its op time, its scan 2.3x)."""
    def f(x):
        return jax.lax.fori_loop(0, 3, lambda i, y: jnp.sin(y) * 2.0 + y, x).sum()

    hlo = jax.jit(f).lower(jnp.ones((4, 8))).compile().as_text()
    containers = re.findall(r"%([\w.\-]+) = \S+(?: \S+)* (?:while|call|conditional)\(", hlo)
    assert containers, "the program has a loop"
    sources = op_sources(hlo)
    assert sources and not set(containers) & set(sources)
    assert any("while/body" in src for src in sources.values())  # its body's ops, with their sources


def test_long_cache_decode_measures_each_dtype_from_the_same_keys():
    """benchmarks.decode (and the accelerator script's part 7 through it): every dtype's cache holds the same random
    keys and values (rounded to its dtype), each row of the table is timed and bounded by its own bytes, and the
    most a dtype can gain is float32's bound over its own."""
    from benchmarks.decode import filled_cache, measure, table
    from common.attention import kv_store
    from jamba_jax.layers import KVCache

    cfg = jamba_jax.JambaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, attn_layer_period=2, attn_layer_offset=1,
                                num_experts=1, num_experts_per_tok=1, mamba_d_state=4, mamba_dt_rank=4)
    stores = {d: next(c for c in filled_cache(cfg, 16, d, batch=2).layers if isinstance(c, KVCache))
              for d in ("float32", "bfloat16", "int8")}
    ref = kv_store.read(stores["float32"].k, jnp.float32)
    assert ref.shape == (2, 2, 16 + 64, 8) and float(jnp.abs(ref[:, :, :16]).std()) > 0.5
    assert not bool(jnp.any(ref[:, :, 16:]))  # the decode slots start empty
    for d, tol in (("bfloat16", 1e-2), ("int8", 2e-2)):
        np.testing.assert_allclose(kv_store.read(stores[d].k, jnp.float32), ref, atol=tol * 4)
    result = measure(16, ["float32", "int8"], cfg, batch=2, bandwidth=1e10, contexts=(16,))
    rows = {r["dtype"]: r for r in result["rows"]}
    assert set(rows) == {"float32", "int8"} and all(r["step_s"] > 0 and r["batch"] == 2 for r in rows.values())
    assert rows["int8"]["bytes"] < rows["float32"]["bytes"]
    assert result["errors"]["float32"] == 0.0 and 0 < result["errors"]["int8"] < 0.05
    int8_line = next(line for line in table(result) if line.startswith("| int8 "))
    assert f"| {rows['float32']['bytes'] / rows['int8']['bytes']:.2f}x |" in int8_line
