"""Serve a checkpoint over an OpenAI-compatible HTTP API with continuous batching:
python main.py --config=configs/serve.py --config.checkpoint=DIR (or `jamba-serve --config.checkpoint=DIR`);
DIR as in generation (a training workdir, a LoRA run's merged into its base, an orbax or a Hugging Face dir).
The engine and the server: serving/ (tasks/serve.py)."""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.task = "serve"  # runs tasks/serve.py
    c.checkpoint = "workdir"  # training workdir (newest checkpoint), `tasks.convert` output or a HF directory
    c.step = 0  # a workdir's step to serve (0 = its newest intact one)
    c.host = "127.0.0.1"  # 0.0.0.0 to listen on every interface
    c.port = 8000
    c.model_name = ""  # the name clients ask for ("" = the checkpoint directory's name)
    c.tokenizer = ""  # tokenizer.json ("" = the checkpoint's own, else the bundled BPE)
    c.max_num_seqs = 8  # slots: sequences decoded together
    c.max_model_len = 2048  # tokens per slot (prompt + output); sized against device memory at start
    c.max_num_batched_tokens = 512  # tokens per engine step: decoding slots + prompt pieces
    c.prefill_chunk = 256  # the longest prompt piece (a power of two)
    c.decode_steps = 8  # decode steps per device call (tokens reach clients, and requests join, between calls)
    c.max_queue = 1024  # waiting requests beyond which new ones get HTTP 503
    c.default_max_tokens = 16  # max_tokens of a request that names none (OpenAI's completions default)
    c.quantize = ""  # "experts_int8": the experts' weights int8 (ExpertsInt8) as they load
    c.cache_dtype = ""  # KV cache dtype: float32, bfloat16 or int8 ("" = the model's kv_cache_dtype or compute dtype)
    c.dtype = ""  # compute dtype ("" = the checkpoint's; bfloat16 on accelerators)
    # the devices present as a mesh (-1: the rest of them): tensor parallel by default; expert > 1 splits the
    # experts (and their tokens) over devices; the weights and KV heads shard by their logical axes
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "context": 1, "expert": 1, "tensor": -1})
    return c
