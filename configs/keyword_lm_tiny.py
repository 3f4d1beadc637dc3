"""The baselines of auxiliary tuning on CPU: the tiny Jamba with a keyword prefix, fine-tuned in full
from the quick start's workdir (init_from) or trained from scratch (init_from=""), on the same data,
keywords and evaluation as configs/aux_tuning_tiny.py.

  python main.py --config=configs/keyword_lm_tiny.py --workdir=workdir_kw --config.init_from=workdir
"""

from configs import aux_tuning_tiny, jamba_tiny


def get_config():
    config = aux_tuning_tiny.get_config()
    config.task = "keyword_lm"
    del config["frozen_lm"]
    del config["frozen_lm_quantize"]
    del config["sample_keywords"]
    config.init_from = "workdir"  # a jamba_lm workdir to fine-tune ("" = train from scratch)
    config.learning_rate = 3e-3  # the tiny LM's rate
    config.model = jamba_tiny.get_config().model  # the architecture (init_from's config wins when set)
    return config
