"""Generate text from a checkpoint: python main.py --config=configs/generate.py
--config.checkpoint=DIR --config.prompt="..." (DIR: a training workdir, a LoRA run's included, a converted
orbax dir or a Hugging Face dir); --config.chat=True answers the prompt as a chat turn (tasks/generate.py)."""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.task = "generate"  # runs tasks/generate.py
    c.checkpoint = "workdir"  # training workdir (newest checkpoint), `tasks.convert` output or a HF directory
    c.prompt = "dog:"  # text to continue
    c.max_new_tokens = 64  # tokens to generate
    c.temperature = 0.0  # 0 = greedy
    c.top_k = 0  # 0 = no top-k filter
    c.top_p = 0.0  # 0 = no nucleus filter; else in (0, 1]
    c.seed = 0  # sampling PRNG seed
    c.prefill_chunk = 0  # prompt chunk size (0 = chosen from a memory budget: jamba_jax.generation)
    c.kv_cache_dtype = ""  # float32, bfloat16 or int8 ("" = the checkpoint's kv_cache_dtype or compute dtype)
    c.tokenizer = ""  # tokenizer.json / SentencePiece model ("" = the checkpoint's own, else the bundled BPE)
    c.chat = False  # True: the prompt is a user message in the tokenizer's chat template; only the reply printed
    c.system = ""  # chat: a system message before it ("" = none)
    return c
