"""Keyword-conditioned generation from an auxiliary-tuning run, streamed to stdout:

  python main.py --config=configs/aux_tuning_generate.py --config.checkpoint=workdir_aux \
      --config.keywords="river,stone"
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.task = "aux_tuning_generate"  # runs tasks/aux_tuning_generate.py
    c.checkpoint = "workdir_aux"  # an aux_tuning workdir (its frozen LM is read from where the run found it)
    c.keywords = "river,stone"  # comma-separated conditioning keywords
    c.prompt = ""  # text the continuation starts from (after <bos>)
    c.max_new_tokens = 48  # tokens to generate
    c.temperature = 1.0  # 0 = greedy
    c.top_k = 0  # top-k sampling (0: off)
    c.seed = 0  # sampling seed
    return c
