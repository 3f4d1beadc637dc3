"""LoRA adapters out as a PEFT adapter directory (`adapter_config.json` + `adapter_model.safetensors`) that
`peft.PeftModel.from_pretrained(transformers' JambaForCausalLM, DIR)` loads unchanged: tensors named as peft
names them (`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`, A [r, in] and B [out, r] in
torch's Linear layout), the update scaled by lora_alpha / r as ours is.

The experts: transformers' JambaExperts holds each layer's experts as two 3-D parameters, gate_up_proj
[E, 2I, H] (gate rows, then up rows) and down_proj [E, H, I], which peft adapts through `target_parameters`
(its ParamWrapper: A [E*r, in] expert-major, B [out, r*E] expert-minor, delta_e = B_e A_e). Our separate gate
and up adapters (rank r each) are exactly one rank-2r adapter on gate_up_proj (A stacked, B block-diagonal),
written with `rank_pattern` / `alpha_pattern` so that its scale stays alpha / r; peft nests the wrappers in
the parameters' order, gate_up_proj innermost (`experts.base_layer.lora_*`) when down_proj is adapted too.
peft refuses dropout with target_parameters, so such an adapter says lora_dropout 0 (it is for inference;
dropout changes nothing there).

dt_proj has no adapter form: transformers' JambaMambaMixer multiplies by `dt_proj.weight` directly instead of
calling the module, so peft's LoRA layer there would load and be ignored. A run that adapted dt_proj exports
merged weights (as AI21's own LoRA recipe leaves dt_proj out, the default targets do).
"""

from __future__ import annotations

import json
import os

import numpy as np
from safetensors.numpy import save_file

from common.files import atomic_write
from common.tree import get_path
from jamba_jax.config import JambaConfig
from jamba_jax.hf_checkpoint import CheckpointError
from jamba_jax.layout import layer_location
from jamba_jax.lora import TARGETS, LoraConfig

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
# our target -> transformers' module inside a decoder layer
MODULES = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
           "o_proj": "self_attn.o_proj", "in_proj": "mamba.in_proj", "x_proj": "mamba.x_proj",
           "out_proj": "mamba.out_proj", "gate_proj": "feed_forward.gate_proj",
           "up_proj": "feed_forward.up_proj", "down_proj": "feed_forward.down_proj"}


EXPERT_PARAMETERS = {"experts.gate_proj": "gate_up_proj", "experts.up_proj": "gate_up_proj",
                     "experts.down_proj": "down_proj"}


def _expert_keys(lora: LoraConfig) -> dict[str, str]:
    """{transformers expert parameter: its peft module key suffix}, as peft nests the wrappers."""
    params = [p for p in ("gate_up_proj", "down_proj") if any(EXPERT_PARAMETERS.get(t) == p for t in lora.targets)]
    return {p: "feed_forward.experts" + ".base_layer" * (len(params) - 1 - k) for k, p in enumerate(params)}


def _expert_tensors(lora: LoraConfig, get, key: str) -> dict[str, np.ndarray]:
    """peft's tensors for one layer's experts; get(target) -> (A [E, in, r], B [E, r, out]) or None."""
    out, keys = {}, _expert_keys(lora)
    for param, parts in (("gate_up_proj", ("experts.gate_proj", "experts.up_proj")),
                         ("down_proj", ("experts.down_proj",))):
        if param not in keys:
            continue
        found = [(i, get(t)) for i, t in enumerate(parts) if t in lora.targets]
        rank = lora.rank * len(found)
        n_exp, n_in = found[0][1][0].shape[:2]
        n_out = found[0][1][1].shape[-1]
        a = np.zeros((n_exp, rank, n_in), np.float32)
        b = np.zeros((len(parts) * n_out, rank, n_exp), np.float32)  # gate_up: the gate rows, then the up rows
        for j, (part, (a_part, b_part)) in enumerate(found):
            ranks = slice(j * lora.rank, (j + 1) * lora.rank)
            a[:, ranks] = np.swapaxes(a_part, 1, 2)
            b[part * n_out:(part + 1) * n_out, ranks] = np.transpose(b_part, (2, 1, 0))
        out[f"{key}.{keys[param]}.lora_A.weight"] = a.reshape(n_exp * rank, n_in)
        out[f"{key}.{keys[param]}.lora_B.weight"] = b.reshape(b.shape[0], rank * n_exp)
    return out


def peft_tensors(cfg: JambaConfig, lora: LoraConfig, adapters: dict) -> dict[str, np.ndarray]:
    """{peft key: float32 tensor} of every adapter, layer by layer (either layout)."""
    if "dt_proj" in lora.targets:
        raise CheckpointError("a dt_proj adapter has no PEFT form: transformers' Jamba reads dt_proj.weight directly, "
                              "so peft would load it and ignore it (jamba_jax.peft_adapter); export the merged model "
                              "(without --adapter)")
    out = {}
    for i in range(cfg.num_hidden_layers):
        path, index = layer_location(cfg, i)

        def get(target, path=path, index=index):
            *parent, name = path + TARGETS[target]
            try:
                a, b = (get_path(adapters, (*parent, f"{name}_lora_{x}")) for x in "ab")
            except KeyError:
                return None  # not this kind of layer
            return np.asarray(a[index], np.float32), np.asarray(b[index], np.float32)

        key = f"base_model.model.model.layers.{i}"
        for target in lora.targets:
            if target in MODULES and (found := get(target)) is not None:
                a, b = found
                out[f"{key}.{MODULES[target]}.lora_A.weight"] = np.ascontiguousarray(a.T)  # [r, in]
                out[f"{key}.{MODULES[target]}.lora_B.weight"] = np.ascontiguousarray(
                    b.reshape(b.shape[0], -1).T)  # [out, r]
        if any(get(t) is not None for t in EXPERT_PARAMETERS if t in lora.targets):
            out.update(_expert_tensors(lora, get, key))
    return out


def peft_config(lora: LoraConfig, base_model: str) -> dict:
    """adapter_config.json: Linear targets as target_modules, expert ones as target_parameters (module
    docstring)."""
    params = sorted({EXPERT_PARAMETERS[t] for t in lora.targets if t in EXPERT_PARAMETERS})
    gate_up = sum(t in lora.targets for t in ("experts.gate_proj", "experts.up_proj"))
    rank_pattern = {"feed_forward.experts.gate_up_proj": lora.rank * gate_up} if gate_up == 2 else {}
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.alpha,
            "lora_dropout": 0.0 if params else lora.dropout, "bias": "none",
            "target_modules": sorted(t for t in lora.targets if t in MODULES),
            "target_parameters": [f"feed_forward.experts.{p}" for p in params] or None,
            "rank_pattern": rank_pattern, "alpha_pattern": {k: lora.alpha * v / lora.rank
                                                            for k, v in rank_pattern.items()},
            "base_model_name_or_path": base_model, "fan_in_fan_out": False, "inference_mode": True,
            "use_rslora": False, "use_dora": False, "init_lora_weights": True, "modules_to_save": None}


def save_peft_adapter(cfg: JambaConfig, lora: LoraConfig, adapters: dict, path: str, base_model: str) -> None:
    """Writes the adapter directory (atomically, file by file)."""
    tensors = peft_tensors(cfg, lora, adapters)
    os.makedirs(path, exist_ok=True)
    config = peft_config(lora, base_model)
    atomic_write(os.path.join(path, ADAPTER_WEIGHTS), lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))

    def write_config(tmp):
        with open(tmp, "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)

    atomic_write(os.path.join(path, ADAPTER_CONFIG), write_config)
