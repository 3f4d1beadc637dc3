"""Word in context on pairs of WordNet example sentences (same synset or not; test lemmas unseen),
from a pre-trained SenseBERT (or BERT) encoder:

  python main.py --config=configs/sensebert_wic.py --config.init_checkpoint=workdir/sensebert \\
      --workdir=workdir/sensebert_wic
"""

from configs.sensebert_tagging import get_config as tagging_config


def get_config():
    config = tagging_config()
    config.head = "wic"  # [CLS] s1 [SEP] s2 [SEP] -> same synset or not
    config.seq_len = 96  # [CLS] s1 [SEP] s2 [SEP] (the longest pair has 92)
    config.batch_size = 32  # pairs per step
    config.num_train_steps = 500  # optimizer steps
    return config
