"""Trains, evaluates or runs any task of this project (Jamba, SenseBERT, auxiliary tuning, exemplar-guided
active learning) from a config file:

  python main.py --config=configs/jamba_tiny.py [--workdir=DIR] [--config.field=value ...]

runs `tasks/<config.task>.py` (see `tasks`); any config field can be overridden on the command line, and
--config also takes a bundled config by name (--config=sensebert_tiny). Installed (`pip install .`), the
same program is `jamba-train`, and `jamba-generate` / `jamba-serve` are it with configs/generate.py /
configs/serve.py as the default config.
Errors you can cause print one line, `error: ...`, and exit with status 2 (--verbose: the traceback).
"""

import os
import sys

from absl import app, flags, logging

import configs
from common.cli import (
    ConfigArgumentError,
    command_line_fields,
    config_argument,
    describe_config_error,
    help_text,
    user_errors,
    verbose_requested,
    with_config_path,
)

# the installed `jamba-generate` and `jamba-serve` commands are this program with the generation or the
# serving config as its default (ml_collections reads the default while defining the flag, so the choice is
# made here)
_COMMAND_CONFIGS = {"jamba-generate": "generate", "jamba-serve": "serve"}
DEFAULT_CONFIG = configs.resolve(next((c for cmd, c in _COMMAND_CONFIGS.items()
                                       if os.path.basename(sys.argv[0]).startswith(cmd)), "jamba_tiny"))
FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "workdir", "Directory for checkpoints, metrics and logs.")
flags.DEFINE_bool("verbose", False, "Show the traceback of errors the user can cause too (also JAMBA_JAX_VERBOSE=1).")


def _config_path(argv) -> str:
    return config_argument(argv)[1] or DEFAULT_CONFIG


def _parse_flags(argv):
    try:
        return FLAGS(argv)
    except flags.Error as e:  # e.g. --config.num_train_steps=abc
        raise ConfigArgumentError(str(e)) from e
    except Exception as e:  # the config file itself fails to load (a syntax error, ...)
        if verbose_requested(argv[1:]):
            raise
        raise ConfigArgumentError(describe_config_error(e, argv, _config_path(argv))) from None


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
        raise ConfigArgumentError(describe_config_error(e, sys.argv, _config_path(sys.argv))) from None
    import tasks
    from training import distributed

    with config.unlocked():  # which fields the command line set (a fine-tuning start refuses some: tasks/jamba_lm.py)
        config.cli_overrides = command_line_fields(sys.argv)
    distributed.initialize(config)  # multi-host: before JAX touches a device
    tasks.run(config, FLAGS.workdir)


def cli():
    sys.argv = with_config_path(sys.argv, configs.resolve)
    verbose = verbose_requested()
    if "--help" in sys.argv[1:] or "-h" in sys.argv[1:]:
        print(help_text(__doc__, _config_path(sys.argv),
                        f"{os.path.basename(sys.argv[0])} [--config=FILE|NAME] [--workdir=DIR] "
                        "[--config.field=value ...] [--verbose]"))
        sys.exit(0)
    with user_errors(verbose):
        from ml_collections import config_flags

        try:  # ml_collections loads the file and applies the --config.* overrides right here
            config_flags.DEFINE_config_file("config", DEFAULT_CONFIG,
                                            "Path to a config file with get_config() (default: the tiny Jamba).")
        except Exception as e:
            if verbose:
                raise
            raise ConfigArgumentError(describe_config_error(e, sys.argv, _config_path(sys.argv))) from None
        app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    cli()
