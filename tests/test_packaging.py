"""The project installs (`pip install .` / `git+URL`): the wheel holds every package, the bundled data
and the five commands; and main.py runs from any directory."""

import os
import shutil
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_wheel_holds_the_packages_the_data_and_the_commands(tmp_path):
    # built from a copy: setuptools writes build/ and *.egg-info beside the sources
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "build", "workdir*", "bench_*", "__pycache__",
                                                             "*.egg-info", ".pytest_cache", ".ruff_cache"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path), str(src)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    [wheel] = [f for f in os.listdir(tmp_path) if f.endswith(".whl")]
    with zipfile.ZipFile(tmp_path / wheel) as z:
        names = set(z.namelist())
        entry_points = next(z.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    for needed in ("main.py", "configs/jamba_tiny.py", "kernels/ssm_pallas_tpu.py", "common/layers.py",
                   "jamba_jax/model.py", "common/wordnet_lexicon.json.gz", "training/task.py", "tasks/jamba_lm.py",
                   "data/tokenizer/tokenizer.json", "data/wordnet_corpus/train.txt.gz",
                   "data/sensebert_eval/tagging.jsonl.gz", "data/sensebert_wordpiece/vocab.txt",
                   "aux_tuning/model.py", "active_learning/strategies.py", "serving/engine.py", "configs/serve.py",
                   "data/egal_pools/pseudowords.jsonl.gz"):
        assert needed in names, needed
    for command in ("jamba-train", "jamba-generate", "jamba-serve", "jamba-convert", "sensebert-predict"):
        assert f"{command} =" in entry_points, command


def main_in(directory, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), *args], capture_output=True, text=True,
                          cwd=directory, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_main_runs_from_another_directory_and_names_bundled_configs(tmp_path):
    """From a directory without configs/ (as an installed command runs), --config takes a bundled config by
    its repository path or by its name."""
    out = main_in(tmp_path, "--config=configs/jamba_tiny.py", "--config.dry_run=True", f"--workdir={tmp_path / 'w'}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "dry run: 3,359,384 parameters" in out.stdout
    out = main_in(tmp_path, "--config=sensebert_tiny", "--config.dry_run=True", f"--workdir={tmp_path / 'w'}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "dry run: 1,377,664 parameters" in out.stdout


def test_help_describes_the_program_and_lists_the_config_fields(tmp_path):
    out = main_in(tmp_path, "--help")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("Trains, evaluates or runs any task") and "usage:" in out.stdout
    for field in ("--config.num_train_steps", "--config.model.hidden_size", "--config.data.tokenizer"):
        assert field in out.stdout, field
    out = main_in(tmp_path, "--config=generate", "--help")
    assert out.returncode == 0 and "--config.prompt" in out.stdout and "--config.seq_len" not in out.stdout
