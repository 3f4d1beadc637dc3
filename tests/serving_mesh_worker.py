"""The serving engine on N virtual CPU devices (a tensor x expert mesh), for tests/test_serving.py: a
small random Jamba, plain and int8 (ExpertsInt8 weights with an int8 KV cache in one engine: each engine compiles
programs of its own), each request's greedy tokens from the engine on the mesh and from generate()
on one device. JAX reads XLA_FLAGS once, so the mesh needs its own process.

  python tests/serving_mesh_worker.py --devices 8 --mesh '{"tensor": 2, "expert": 4}'

Prints one line "RESULT {json}": per weights kind, the engine's tokens and generate()'s, and the
compilations after the warm-up.
"""

import argparse
import json
import os
import sys

ap = argparse.ArgumentParser()
ap.add_argument("--devices", type=int, required=True)
ap.add_argument("--mesh", required=True)
args = ap.parse_args()
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import jamba_jax  # noqa: E402
import serving  # noqa: E402
from common.attention import kv_store  # noqa: E402
from common.sharding import make_mesh  # noqa: E402
from jamba_jax.params import init_params  # noqa: E402


class Ids:
    def decode(self, ids):
        return " ".join(map(str, ids))


cfg = jamba_jax.JambaConfig(vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                            attn_layer_period=4, attn_layer_offset=2, mamba_d_state=8, mamba_dt_rank=8)
params = init_params(cfg, jax.random.PRNGKey(0))
params["lm_head"] = params["lm_head"] * 20  # peaky next-token distributions: greedy choices far from ties
plain = jamba_jax.JambaForCausalLM(cfg)
rng = np.random.default_rng(0)
prompts = [rng.integers(1, 256, size=int(rng.integers(1, 20))).tolist() for _ in range(6)]
mesh = make_mesh(json.loads(args.mesh))
MAX_MODEL_LEN = 48  # the engines', and the cache of generate() alone (one shape: one program for every prompt)
result = {}
int8 = jamba_jax.JambaForCausalLM(cfg.replace(kv_cache_dtype="int8"))
runs = [("plain", plain, params), ("int8", int8, jamba_jax.quantize_experts_int8(cfg, params))]
for kind, model, weights in runs:
    alone = [jamba_jax.generate(model, weights, np.asarray([p]), max_new_tokens=10, prefill_chunk=1,
                                max_length=MAX_MODEL_LEN)[0].tolist() for p in prompts]
    engine = serving.Engine(model, weights, Ids(), serving.EngineConfig(max_num_seqs=4, max_model_len=MAX_MODEL_LEN,
                                                                        max_num_batched_tokens=8, prefill_chunk=8,
                                                                        decode_steps=2),  # (fewer programs)
                            mesh=mesh)
    engine.warmup()
    before = serving.compilations()
    requests = engine.generate(prompts, serving.SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    kv = engine.cache.layers[2].k
    kv = kv.q if isinstance(kv, kv_store.Int8KV) else kv  # (an int8 store: its values, the scales split alike)
    result[kind] = {"engine": [r.output_ids for r in requests], "alone": alone,
                    "compilations": serving.compilations() - before, "kv_sharding": str(kv.sharding.spec),
                    "kv_dtype": str(kv.dtype), "expert_dtype": str(engine.params["model"]["layers_1"]["feed_forward"]
                                                                    ["experts"]["gate_proj"].dtype),
                    "devices": len(engine.params["lm_head"].sharding.device_set)}
print("RESULT " + json.dumps(result))
