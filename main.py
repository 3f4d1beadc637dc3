"""Entry point: python main.py --config=configs/jamba_tiny.py [--workdir=DIR] [--config.field=value ...]

Dispatches on `config.task`. Any config field can be overridden on the command line.
"""

from absl import app, flags, logging
from ml_collections import config_flags

import tasks
from training import distributed

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/jamba_tiny.py", "Path to a config file with get_config().")
flags.DEFINE_string("workdir", "workdir", "Directory for checkpoints, metrics and logs.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax and XLA log every step at INFO
    distributed.initialize(FLAGS.config)  # multi-host: before JAX touches a device
    tasks.run(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
