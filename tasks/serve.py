"""Serving a checkpoint: the continuous-batching engine behind an OpenAI-compatible HTTP API.

  python main.py --config=configs/serve.py --config.checkpoint=DIR [--config.port=8000 ...]
  jamba-serve --config.checkpoint=DIR

loads the checkpoint (a training workdir, a LoRA run's adapters merged into its base, an orbax or a Hugging
Face directory; ExpertsInt8 with --config.quantize=experts_int8), sizes max_num_seqs x max_model_len against
the device (refused in one line when it cannot fit), shards the weights and the cache over the devices present
(config.mesh: tensor parallel by default, expert parallel with --config.mesh.expert), compiles every program
(warm-up), then serves until SIGTERM or Ctrl-C, letting open requests finish. Endpoints, errors:
serving/server.py.
"""

from __future__ import annotations

import os

from common.sharding import make_mesh, rules_from_config
from common.tokenizers import load_tokenizer
from jamba_jax import JambaForCausalLM, load_checkpoint
from jamba_jax.checkpoint import checkpoint_end_tokens, checkpoint_tokenizer, locate_checkpoint
from jamba_jax.hf_checkpoint import CheckpointError
from serving.engine import Engine, EngineConfig
from serving.server import bind, serve


def engine_config(config) -> EngineConfig:
    return EngineConfig(max_num_seqs=config.max_num_seqs, max_model_len=config.max_model_len,
                        max_num_batched_tokens=config.max_num_batched_tokens, prefill_chunk=config.prefill_chunk,
                        decode_steps=config.decode_steps,
                        max_queue=config.max_queue, cache_dtype=config.cache_dtype or None)


def build_engine(config) -> tuple[Engine, str, str]:
    """(the engine over config.checkpoint, its model name, the checkpoint's description), not yet warmed up."""
    if not config.checkpoint:
        raise CheckpointError("set --config.checkpoint to a training workdir, an orbax or a Hugging Face directory")
    source = locate_checkpoint(config.checkpoint, config.step or None)
    overrides = {"dtype": config.dtype} if config.dtype else {}
    cfg, params = load_checkpoint(source, quantize=config.quantize or None, **overrides)
    tokenizer = load_tokenizer(config.tokenizer or checkpoint_tokenizer(source), cfg.vocab_size, source.description,
                               field="config.tokenizer")
    ends = checkpoint_end_tokens(source, tokenizer)
    engine = Engine(JambaForCausalLM(cfg), params, tokenizer, engine_config(config),
                    end_ids=ends if isinstance(ends, list) else [] if ends is None else [ends],
                    mesh=make_mesh(config.mesh), rules=rules_from_config(config.mesh))
    return engine, config.model_name or os.path.basename(os.path.normpath(source.path)), source.description


def run(config, workdir: str) -> None:
    del workdir
    engine, name, description = build_engine(config)
    sock = bind(config.host, config.port)  # before the warm-up: a port in use fails at once
    seconds = engine.warmup()
    print(f"serving {name!r} ({description}) on http://{config.host}:{sock.getsockname()[1]}/v1: "
          f"{config.max_num_seqs} slots x {config.max_model_len} tokens, "
          f"{engine.memory['total'] / 2**30:.2f} GiB; warm-up {seconds:.1f} s", flush=True)
    serve(engine, sock, name, config.default_max_tokens)
