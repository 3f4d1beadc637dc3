"""Tiny SenseBERT pre-trained on the bundled WordNet corpus with the bundled 4096-piece WordPiece
vocabulary; a few minutes on a 2-core CPU.

  python main.py --config=configs/sensebert_tiny.py --workdir=workdir/sensebert
  python main.py --config=configs/sensebert_tiny.py --config.sensebert.use_supersenses=False \\
      --workdir=workdir/bert      # the plain-BERT baseline: same data, steps and model
"""

import ml_collections

from configs.common import training_config


def sensebert_fields(config):
    """The fields every SenseBERT config (pre-training and fine-tuning) shares."""
    config.sensebert = ml_collections.ConfigDict()
    config.sensebert.use_supersenses = True  # False: plain BERT (no supersense input term or losses)
    config.sensebert.vocab_file = ""  # WordPiece vocab.txt ("" = the bundled 4096-piece vocabulary)
    config.sensebert.whole_words_file = ""  # words (one per line) added to the vocabulary as single pieces
    config.sensebert.sample_sentence = ""  # pre-training: print its predicted supersenses at the end

    model = ml_collections.ConfigDict()  # SenseBertConfig fields on top of a preset
    model.preset = "tiny"  # tiny (128 wide, 4 layers) | base (768) | large (1024)
    model.vocab_size = -1  # -1: the tokenizer's
    model.hidden_dropout_prob = 0.1  # BERT's dropout
    model.dtype = "float32"  # compute dtype
    config.model = model
    return config


def get_config():
    config = sensebert_fields(training_config())
    config.task = "sensebert_pretrain"
    config.num_train_steps = 1000  # optimizer steps (about 5 minutes on 2 CPU cores)
    config.batch_size = 32  # sentences per step
    config.seq_len = 48  # pieces per sentence ([CLS] ... [SEP], longer sentences cut at a word)
    config.learning_rate = 1e-3  # tiny models like a high rate
    config.warmup_steps = 100  # linear warmup
    config.weight_decay = 0.01  # BERT's decay
    config.adam_b2 = 0.98  # RoBERTa's beta2
    config.log_every_steps = 50  # metrics cadence
    config.eval_every_steps = 500  # eval cadence
    config.eval_batches = 8  # validation batches per eval
    config.save_every_steps = 500  # checkpoint cadence
    config.sensebert.sample_sentence = "The bass player sat on the bank of the river and played a song."
    return config
