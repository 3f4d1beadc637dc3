"""Supersense tagging on WordNet's example sentences (test lemmas unseen in training), from a
pre-trained SenseBERT (or BERT) encoder:

  python main.py --config=configs/sensebert_tagging.py --config.init_checkpoint=workdir/sensebert \\
      --workdir=workdir/sensebert_tagging
"""

from configs.common import training_config
from configs.sensebert_tiny import sensebert_fields


def get_config():
    config = sensebert_fields(training_config())
    config.task = "sensebert_finetune"
    config.head = "tagging"  # sensebert_jax.finetune.HEADS: tagging | wic
    config.init_checkpoint = ""  # a sensebert_pretrain workdir whose encoder starts the model ("" = random)
    config.num_train_steps = 500  # optimizer steps
    config.batch_size = 64  # sentences per step
    config.seq_len = 80  # pieces per example (the longest has 78; a longer one is an error, not cut)
    config.learning_rate = 5e-4  # fine-tuning rate
    config.warmup_steps = 50  # linear warmup
    config.weight_decay = 0.01  # BERT's decay
    config.log_every_steps = 50  # metrics cadence
    config.eval_every_steps = 250  # eval cadence (eval_accuracy on the test lemmas)
    config.eval_batches = 1000  # all of the test split
    config.save_every_steps = 500  # checkpoint cadence
    return config
