"""Entry point: python main.py --config=configs/jamba_tiny.py [--workdir=DIR] [--config.field=value ...]

Runs `tasks/<config.task>.py` (see `tasks`). Any config field can be overridden on the command line.
Installed (`pip install .`), the same program is `jamba-train`, and `jamba-generate` is it with
configs/generate.py as the default config.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

import tasks
from training import distributed

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
# the installed `jamba-generate` command is this program with the generation config as its default
# (ml_collections reads the default while defining the flag, so the choice is made here)
DEFAULT_CONFIG = "generate.py" if os.path.basename(sys.argv[0]).startswith("jamba-generate") else "jamba_tiny.py"
FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", os.path.join(CONFIGS, DEFAULT_CONFIG),
                                "Path to a config file with get_config() (default: the tiny Jamba).")
flags.DEFINE_string("workdir", "workdir", "Directory for checkpoints, metrics and logs.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax and XLA log every step at INFO
    distributed.initialize(FLAGS.config)  # multi-host: before JAX touches a device
    tasks.run(FLAGS.config, FLAGS.workdir)


def cli():
    app.run(main)


if __name__ == "__main__":
    cli()
