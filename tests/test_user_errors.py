"""Errors a user can cause, through the command lines as a user meets them: one line on stderr,
`error: ...` naming the field, file or step and what was expected, exit status 2, no traceback;
--verbose shows the traceback. Also the memory pre-flight, the files' permissions, and fine-tuning's bad
inputs (chat lines, a start that is not a checkpoint, a vocabulary that does not fit)."""

import os
import subprocess
import sys
import time

import pytest
from conftest import make_hf_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(ROOT, "main.py")
ENV = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}


def run(*args, cwd=None):
    start = time.perf_counter()
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=ENV, cwd=cwd, timeout=600)
    return out, time.perf_counter() - start


def assert_one_line_error(out, *needles):
    err = out.stderr.strip()
    assert out.returncode == 2, (out.returncode, err[-2000:])
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err[-2000:]
    for n in needles:
        assert n in err, (n, err)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    (d / "good.txt").write_text("a dog runs\na cat sleeps\n")
    (d / "bad.txt").write_bytes(b"fine line\nbroken \xff line\n")
    (d / "broken_config.py").write_text("def get_config(:\n")
    return d


CASES = {
    "unknown_field": (["--config.no_such=1"], ["--config.no_such", "has no field 'no_such'"]),
    "misspelt_field": (["--config.model.hiden_size=3"], ["closest: model.hidden_size"]),
    "missing_config_file": (["--config=/nonexistent/config.py"], ["/nonexistent/config.py does not exist"]),
    "broken_config_file": (["--config={d}/broken_config.py"], ["broken_config.py cannot be loaded", "SyntaxError"]),
    "bad_value": (["--config.num_train_steps=abc"], ["--config.num_train_steps=abc", "invalid literal"]),
    "invalid_utf8": (["--config.data.source=text", "--config.data.train_files={d}/bad.txt",
                      "--config.data.validation_files={d}/good.txt"], ["bad.txt:2: invalid UTF-8", "encoding_errors"]),
    "no_validation_files": (["--config.data.source=text", "--config.data.train_files={d}/good.txt"],
                            ["config.data.validation_files is empty"]),
    "mesh_on_one_device": (["--config={root}/configs/jamba_mini.py"], ["config.mesh=", "devices"]),
    "unknown_task": (["--config.task=jamba_llm"], ["unknown task 'jamba_llm'", "'jamba_lm'"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_main_names_the_problem_in_one_line(case, files, tmp_path):
    args, needles = CASES[case]
    args = [a.format(d=files, root=ROOT) for a in args]
    out, _ = run(MAIN, *args, f"--workdir={tmp_path / 'w'}", cwd=tmp_path)
    assert_one_line_error(out, *needles)
    # nothing half-done is left behind: training never started
    assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_verbose_shows_the_traceback(tmp_path):
    out, _ = run(MAIN, "--config.data.source=nope", "--verbose", f"--workdir={tmp_path}")
    assert out.returncode != 0 and "Traceback" in out.stderr and "DataError" in out.stderr


def test_memory_preflight_refuses_jamba_mini_on_one_cpu_device_quickly_without_allocating(tmp_path):
    # the peak RSS of this process's own address space (VmHWM): getrusage's ru_maxrss would also count the
    # pytest worker's peak, which Linux carries into a child across fork + exec
    probe = ("import atexit, runpy, sys; "
             "atexit.register(lambda: print('MAXRSS_KB', [l.split()[1] for l in open('/proc/self/status') "
             "if l.startswith('VmHWM:')][0], file=sys.stderr)); "
             f"sys.argv = [{MAIN!r}] + sys.argv[1:]; runpy.run_path({MAIN!r}, run_name='__main__')")
    out, seconds = run("-c", probe, f"--config={ROOT}/configs/jamba_mini.py", "--config.mesh.expert=1",
                       f"--workdir={tmp_path / 'w'}")
    err_lines = out.stderr.strip().splitlines()
    rss_kb = int(err_lines[-1].split()[1])
    out.stderr = "\n".join(err_lines[:-1])
    assert_one_line_error(out, "GiB per device", "params 192.1", "optimizer state 384.2", "at least",
                          "--config.dry_run=True")
    assert seconds < 10, seconds  # the bound: jax's import and one abstract trace (5.6 s, cores shared)
    assert rss_kb < 2 * 2**20, rss_kb  # under 2 GiB: the 192 GiB of parameters were never allocated
    assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_other_command_lines_give_one_line_errors(tmp_path):
    out, _ = run("-m", "tasks.convert", "orbax-to-hf", "--src", str(tmp_path / "nothing"), "--dst", str(tmp_path / "o"))
    assert_one_line_error(out, "nothing", "training workdir")
    out, _ = run("-m", "tasks.sensebert_predict", "--workdir", str(tmp_path / "nothing"), "a sentence")
    assert_one_line_error(out, "no such checkpoint directory")
    out, _ = run(MAIN, f"--config={ROOT}/configs/generate.py", f"--config.checkpoint={tmp_path / 'nothing'}")
    assert_one_line_error(out, "nothing")


def test_written_files_honour_the_umask(tmp_path):
    """Atomic writes (HF export, metrics, integrity records) give 0644 under umask 022, not 0600."""
    from common.files import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(str(tmp_path / "a.json"), "{}")
        os.umask(0o027)
        atomic_write_text(str(tmp_path / "b.json"), "{}")
    finally:
        os.umask(old)
    assert oct(os.stat(tmp_path / "a.json").st_mode & 0o777) == oct(0o644)
    assert oct(os.stat(tmp_path / "b.json").st_mode & 0o777) == oct(0o640)


def test_generation_from_a_workdir_is_quiet(tmp_path):
    """No orbax chatter (e.g. 'Given directory is read only') around the generated text; a KV cache dtype that
    does not exist is named in one line."""
    from test_training import small_config

    import tasks

    workdir = str(tmp_path / "run")
    tasks.run(small_config(num_train_steps=2, save_every_steps=2, eval_every_steps=2), workdir)
    out, _ = run(MAIN, f"--config={ROOT}/configs/generate.py", f"--config.checkpoint={workdir}",
                 "--config.prompt=dog:", "--config.max_new_tokens=4")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("dog:")
    assert "read only" not in out.stderr and "WARNING" not in out.stderr.upper(), out.stderr[-2000:]
    out, _ = run(MAIN, f"--config={ROOT}/configs/generate.py", f"--config.checkpoint={workdir}",
                 "--config.prompt=dog:", "--config.max_new_tokens=4", "--config.kv_cache_dtype=int4")
    assert_one_line_error(out, "kv_cache_dtype='int4'", "bfloat16")


# --- fine-tuning (hf_dir and chat_file: conftest.py) ----------------------------------------------
GOOD_LINE = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}'
BAD_INPUTS = {  # name: (chat file lines or None, extra flags, what the one line names)
    "malformed_chat_line": ([GOOD_LINE, '{"messages": [{"role": "user", "content": "hi"'], [],
                            ["chat.jsonl:2", "JSON"]),
    "unknown_role": (['{"messages": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "yo"}]}'],
                     [], ["chat.jsonl:1", "role 'human'", "system, user, assistant"]),
    "no_assistant_turn": (['{"messages": [{"role": "user", "content": "hi"}]}'], [],
                          ["chat.jsonl:1", "no assistant"]),
    "init_from_not_a_checkpoint": (None, ["--config.init_from={d}"], ["holds neither config.json"]),
    "vocabulary_mismatch": (None, ["--config.init_from={small}"], ["has 2048 tokens but the vocabulary of", "has 97",
                                                                   "config.data.tokenizer"]),
}


@pytest.fixture(scope="module")
def small_vocab_dir(tmp_path_factory):
    """A transformers checkpoint of 97 tokens and no tokenizer of its own (the bundled one has 2048)."""
    return make_hf_model(tmp_path_factory.mktemp("small"), seed=0)[1]


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_fine_tuning_inputs_fail_in_one_line_and_write_nothing(case, hf_dir, chat_file, small_vocab_dir,
                                                                   tmp_path):
    lines, flags, needles = BAD_INPUTS[case]
    chat = chat_file
    if lines is not None:
        chat = str(tmp_path / "chat.jsonl")
        with open(chat, "w") as f:
            f.write("\n".join(lines) + "\n")
    (tmp_path / "empty").mkdir()
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / "metrics.jsonl").write_text("kept\n")  # an earlier run's: nothing may write over it
    flags = [f.format(d=tmp_path / "empty", small=small_vocab_dir) for f in flags]
    out, _ = run(MAIN, "--config=jamba_tiny", f"--config.init_from={hf_dir[1]}", "--config.data.source=jsonl",
                 "--config.data.format=chat", f"--config.data.train_files={chat}",
                 f"--config.data.validation_files={chat}", "--config.lora.rank=4", *flags, f"--workdir={workdir}")
    assert_one_line_error(out, *needles)
    assert sorted(os.listdir(workdir)) == ["metrics.jsonl"] and (workdir / "metrics.jsonl").read_text() == "kept\n"
