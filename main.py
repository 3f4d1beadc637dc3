"""Entry point: python main.py --config=configs/jamba_tiny.py [--workdir=DIR] [--config.field=value ...]

Runs `tasks/<config.task>.py` (see `tasks`). Any config field can be overridden on the command line.
Installed (`pip install .`), the same program is `jamba-train`, and `jamba-generate` is it with
configs/generate.py as the default config.

Errors the user can cause (a config field or file, data, a checkpoint, a mesh or a model too big for
the devices) print one line, `error: ...`, and exit with status 2; --verbose (or JAMBA_JAX_VERBOSE=1)
shows their tracebacks too.
"""

import difflib
import importlib.util
import os
import sys

from absl import app, flags, logging

from common.errors import UserError, user_errors, verbose_requested

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
# the installed `jamba-generate` command is this program with the generation config as its default
# (ml_collections reads the default while defining the flag, so the choice is made here)
DEFAULT_CONFIG = os.path.join(CONFIGS, "generate.py" if os.path.basename(sys.argv[0]).startswith("jamba-generate")
                              else "jamba_tiny.py")
FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "workdir", "Directory for checkpoints, metrics and logs.")
flags.DEFINE_bool("verbose", False, "Show the traceback of errors the user can cause too (also JAMBA_JAX_VERBOSE=1).")


class ConfigArgumentError(UserError):
    """--config or a --config.field override that cannot be used."""


def _config_path(argv) -> str:
    for i, a in enumerate(argv[1:], 1):
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return DEFAULT_CONFIG


def _fields(config, prefix=""):
    out = []
    for k, v in config.items():
        out.append(prefix + k)
        if hasattr(v, "items"):
            out += _fields(v, f"{prefix}{k}.")
    return out


def describe_config_error(error: Exception, argv) -> str:
    """One line saying what is wrong with --config / --config.* (ml_collections raises bare
    AttributeError / OSError tracebacks for these)."""
    path = _config_path(argv)
    if not os.path.exists(path):
        return f"config file {path} does not exist (--config expects a Python file with get_config())"
    try:
        spec = importlib.util.spec_from_file_location("_user_config", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        fields = _fields(module.get_config())
    except Exception as e:  # the user's own config file is broken
        return f"config file {path} cannot be loaded: {type(e).__name__}: {e}"
    unknown = []
    for a in argv[1:]:
        if a.startswith("--config."):
            name = a[len("--config."):].split("=", 1)[0]
            if name not in fields:
                close = difflib.get_close_matches(name, fields, n=3, cutoff=0.5)
                unknown.append(f"--config.{name}: {path} has no field {name!r}"
                               + (f"; closest: {', '.join(close)}" if close else ""))
    if unknown:
        return "; ".join(unknown)
    return f"--config {path}: {type(error).__name__}: {' '.join(str(error).split())}"


def _parse_flags(argv):
    try:
        return FLAGS(argv)
    except flags.Error as e:  # e.g. --config.num_train_steps=abc
        raise ConfigArgumentError(str(e)) from e
    except Exception as e:  # the config file itself fails to load (a syntax error, ...)
        if verbose_requested(argv[1:]):
            raise
        raise ConfigArgumentError(describe_config_error(e, argv)) from None


def main(argv):
    if len(argv) > 1:
        raise ConfigArgumentError(f"unexpected arguments {argv[1:]}; flags look like --config.field=value")
    logging.set_verbosity(logging.WARNING)  # orbax and XLA log every step at INFO
    try:
        config = FLAGS.config
        config.get("task", None)  # a config file that failed to load fails at its first use
    except Exception as e:
        if verbose_requested():
            raise
        raise ConfigArgumentError(describe_config_error(e, sys.argv)) from None
    import tasks
    from training import distributed

    distributed.initialize(config)  # multi-host: before JAX touches a device
    tasks.run(config, FLAGS.workdir)


def cli():
    verbose = verbose_requested()
    with user_errors(verbose):
        from ml_collections import config_flags

        try:  # ml_collections loads the file and applies the --config.* overrides right here
            config_flags.DEFINE_config_file("config", DEFAULT_CONFIG,
                                            "Path to a config file with get_config() (default: the tiny Jamba).")
        except Exception as e:
            if verbose:
                raise
            raise ConfigArgumentError(describe_config_error(e, sys.argv)) from None
        app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    cli()
