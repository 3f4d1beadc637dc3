"""Generate text from a checkpoint: python main.py --config=configs/generate.py
--config.checkpoint=DIR --config.prompt="..." (DIR: a training workdir or a converted orbax dir)."""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.task = "generate"  # runs tasks/generate.py
    c.checkpoint = "workdir"  # training workdir (latest checkpoint) or `tasks.convert` output
    c.prompt = "dog:"  # text to continue
    c.max_new_tokens = 64  # tokens to generate
    c.temperature = 0.0  # 0 = greedy
    c.top_k = 0  # 0 = no top-k filter
    c.top_p = 0.0  # 0 = no nucleus filter; else in (0, 1]
    c.seed = 0  # sampling PRNG seed
    c.prefill_chunk = 0  # prompt chunk size (0 = chosen from a memory budget: jamba_jax.generation)
    c.tokenizer = ""  # tokenizer.json / SentencePiece model ("" = the bundled BPE)
    return c
