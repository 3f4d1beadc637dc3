"""Auxiliary tuning on CPU: the tiny Jamba that the quick start trains (`python main.py` writes it to
workdir/) frozen, steered towards keywords by a 340,268-parameter auxiliary Jamba.

  python main.py --config=configs/aux_tuning_tiny.py --workdir=workdir_aux --config.frozen_lm=workdir
"""

import ml_collections

from configs.common import training_config


def get_config():
    config = training_config()
    config.task = "aux_tuning"
    config.frozen_lm = "workdir"  # jamba_lm workdir, converted orbax dir or HF dir (only read)
    config.frozen_lm_quantize = ""  # "experts_int8": quantise the frozen LM as it loads (it never trains)
    config.num_train_steps = 300  # optimizer steps
    config.batch_size = 16  # documents per step
    config.seq_len = 64  # tokens per document row (<bos> text <eos>, cut or padded)
    config.learning_rate = 1e-2  # the auxiliary model is tiny, and its output paths start at zero
    config.warmup_steps = 30  # linear warmup
    config.log_every_steps = 10  # metrics cadence
    config.eval_every_steps = 100  # eval cadence (eval_loss and eval_keyword_rate)
    config.eval_batches = 8  # validation batches per eval
    config.eval_at_start = True  # a step-0 eval row: the starting model's keyword rate and perplexity
    config.save_every_steps = 100  # checkpoint cadence
    config.sample_keywords = "river,stone"  # a sample printed at the end ("" = none)

    aux = ml_collections.ConfigDict()  # the conditioning and its evaluation
    aux.min_keywords = 1  # keywords sampled per document ...
    aux.max_keywords = 3  # ... at most
    aux.skip_words = 3  # keywords come from after a document's first words (its lemmas)
    aux.max_keyword_tokens = 16  # the keyword segment's length (left-padded)
    aux.feature_layers = ()  # frozen LM layers whose outputs are projected into the auxiliary inputs
    aux.keyword_bag = False  # add the keyword-bag term (aux_tuning.model) to the trained model's logits
    aux.eval_samples = 64  # held-out documents whose keywords condition the sampled continuations
    aux.sample_tokens = 32  # tokens per sampled continuation
    aux.temperature = 0.7  # sampling temperature of those continuations
    aux.top_k = 10  # top-k sampling (0: off)
    config.aux = aux

    model = ml_collections.ConfigDict()  # the auxiliary Jamba (JambaConfig fields)
    model.vocab_size = -1  # the frozen LM's
    model.hidden_size = 64  # d_model
    model.intermediate_size = 128  # MLP hidden size
    model.num_hidden_layers = 4  # attention at layer 2, Mamba elsewhere
    model.num_attention_heads = 4  # query heads
    model.num_key_value_heads = 2  # GQA
    model.attn_layer_period = 4  # attention every 4 layers ...
    model.attn_layer_offset = 2  # ... at layer 2
    model.num_experts = 1  # dense MLPs
    model.num_experts_per_tok = 1  # (no MoE)
    model.tie_word_embeddings = True  # logits through its own embeddings: copying a keyword is one attention hop
    model.mamba_d_state = 16  # SSM state size
    model.dtype = "float32"  # compute dtype
    config.model = model
    return config
