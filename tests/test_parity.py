"""Our JambaForCausalLM against transformers' on random small checkpoints (float32).

Logits within 1e-4 absolute on real tokens, router logits and aux loss too, gradients of the LM
loss within 1e-4 relative; configs vary the layer schedule, GQA/MHA, expert count and top-k,
biases and tied embeddings, and batches are left-padded. Every check runs in both parameter
layouts: one subtree per layer, and `scan_layers` (the stack scanned over repeats of the layer
cycle; where a config's depth is a whole number of cycles).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import SMALL, make_hf_model, random_ids

import jamba_jax
from common.tree import get_path
from jamba_jax.layout import layer_location
from jamba_jax.losses import next_token_loss

CONFIGS = {
    "gqa_attn2_moe2": {},
    "mha_attn3_moe3_top1": dict(num_key_value_heads=4, attn_layer_period=3, attn_layer_offset=0,
                                expert_layer_period=3, expert_layer_offset=2, num_experts=8, num_experts_per_tok=1,
                                num_hidden_layers=5),
    "all_moe_top3_biases": dict(attn_layer_period=4, attn_layer_offset=2, expert_layer_period=1,
                                expert_layer_offset=0, num_experts=3, num_experts_per_tok=3, mamba_proj_bias=True,
                                mamba_conv_bias=False, mamba_d_state=16, mamba_expand=1, num_attention_heads=8,
                                num_key_value_heads=1),
    "dense_tied": dict(num_experts=1, num_experts_per_tok=1, tie_word_embeddings=True, mamba_dt_rank=6,
                       attn_layer_period=2, attn_layer_offset=0),
}


def left_padded_batch(vocab, seed=0):
    ids = random_ids((3, 13), vocab, seed)
    mask = np.ones_like(ids)
    mask[1, :4] = 0  # left padding of 4 and 9 tokens
    mask[2, :9] = 0
    ids[mask == 0] = 0  # pad_token_id
    return ids, mask


def scannable(name: str) -> bool:
    cfg = jamba_jax.JambaConfig.from_hf_dict({"model_type": "jamba", **SMALL, **CONFIGS[name]})
    return cfg.num_hidden_layers % cfg.layer_cycle == 0


CASES = [(name, layout) for name in sorted(CONFIGS) for layout in ("unrolled", "scanned")
         if layout == "unrolled" or scannable(name)]


def load(path, layout):
    return jamba_jax.load_hf_checkpoint(path, scan_layers=layout == "scanned")


@pytest.mark.parametrize("name, layout", CASES)
def test_logits_router_logits_and_aux_loss_match_transformers(tmp_path, name, layout):
    hf_model, path = make_hf_model(tmp_path, seed=len(name), **CONFIGS[name])
    cfg, params = load(path, layout)
    ids, mask = left_padded_batch(cfg.vocab_size)
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    with torch.no_grad():  # (transformers' aux loss fails on a model without MoE layers)
        ref = hf_model(torch.tensor(ids), attention_mask=torch.tensor(mask), output_router_logits=n_moe > 0)
    out = jamba_jax.JambaForCausalLM(cfg).apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    real = mask.astype(bool)
    diff = np.abs(np.asarray(out.logits) - ref.logits.numpy())[real]
    assert diff.max() <= 1e-4, diff.max()
    assert np.abs(np.asarray(out.logits)[real]).max() > 0.1  # the comparison is not between near-zeros
    assert len(out.router_logits) == n_moe
    if n_moe:
        for ours, theirs in zip(out.router_logits, ref.router_logits, strict=True):
            theirs = theirs.numpy().reshape(ours.shape)
            np.testing.assert_allclose(np.asarray(ours)[real], theirs[real], atol=1e-5, rtol=0)
        np.testing.assert_allclose(float(out.aux_loss), float(ref.aux_loss), rtol=1e-5)


@pytest.mark.slow  # about 80 s; test_generation checks left-padded batches by default
def test_left_padding_does_not_change_real_token_logits(tmp_path):
    _, path = make_hf_model(tmp_path)
    cfg, params = jamba_jax.load_hf_checkpoint(path)
    model = jamba_jax.JambaForCausalLM(cfg)
    ids, mask = left_padded_batch(cfg.vocab_size)
    padded = model.apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits
    for row in range(ids.shape[0]):
        real = mask[row].astype(bool)
        alone = model.apply({"params": params}, jnp.asarray(ids[row:row + 1, real])).logits[0]
        # 2e-5: the padded row's attention softmax and reductions run over more (masked) slots, which
        # changes float32 summation order; the masked terms themselves contribute exactly zero.
        np.testing.assert_allclose(np.asarray(padded[row])[real], np.asarray(alone), atol=2e-5, rtol=0)


# (our Flax path, transformers parameter name, how to turn the torch gradient into ours)
GRAD_PARAMS = [
    (("model", "layers_0", "mamba", "A_log"), "model.layers.0.mamba.A_log", lambda g: g),
    (("model", "layers_0", "mamba", "dt_proj_kernel"), "model.layers.0.mamba.dt_proj.weight", lambda g: g.T),
    (("model", "layers_2", "mamba", "conv_kernel"), "model.layers.2.mamba.conv1d.weight", lambda g: g[:, 0, :].T),
    (("model", "layers_2", "mamba", "D"), "model.layers.2.mamba.D", lambda g: g),
    (("model", "layers_1", "self_attn", "q_proj", "kernel"), "model.layers.1.self_attn.q_proj.weight", lambda g: g.T),
    (("model", "layers_0", "feed_forward", "router", "kernel"), "model.layers.0.feed_forward.router.weight",
     lambda g: g.T),
    (("model", "layers_2", "feed_forward", "experts", "gate_proj"), "model.layers.2.feed_forward.experts.gate_up_proj",
     lambda g: np.swapaxes(g[:, : g.shape[1] // 2], 1, 2)),
    (("model", "layers_2", "feed_forward", "experts", "down_proj"), "model.layers.2.feed_forward.experts.down_proj",
     lambda g: np.swapaxes(g, 1, 2)),
    (("model", "final_layernorm", "scale"), "model.final_layernorm.weight", lambda g: g),
    (("lm_head",), "lm_head.weight", lambda g: g.T),
]


@pytest.mark.parametrize("layout", ["unrolled", pytest.param("scanned", marks=pytest.mark.slow)])  # scanned: 45 s
def test_gradients_match_torch_autograd(tmp_path, layout):
    hf_model, path = make_hf_model(tmp_path, seed=3)
    cfg, params = load(path, layout)
    ids, mask = left_padded_batch(cfg.vocab_size, seed=3)
    labels = np.where(mask == 1, ids, -100)
    labels[np.arange(len(ids)), np.argmax(mask, axis=1)] = -100  # first real token has no real context
    hf_model.zero_grad()
    hf_model(torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels)).loss.backward()
    torch_grads = dict(hf_model.named_parameters())

    def loss_fn(p):
        logits = jamba_jax.JambaForCausalLM(cfg).apply({"params": p}, ids, attention_mask=mask).logits
        return next_token_loss(logits, jnp.asarray(ids), jnp.asarray(mask))[0]

    grads = jax.grad(loss_fn)(params)
    for path_, torch_name, convert in GRAD_PARAMS:
        if path_[0] == "model" and path_[1].startswith("layers_"):  # where layer i lives in this layout
            where, index = layer_location(cfg, int(path_[1].split("_")[1]))
            ours = get_path(grads, where + path_[2:])[index]
        else:
            ours = get_path(grads, path_)
        theirs = convert(torch_grads[torch_name].grad.numpy())
        rel = np.abs(np.asarray(ours) - theirs).max() / np.abs(theirs).max()
        assert np.abs(theirs).max() > 0, torch_name
        assert rel <= 1e-4, (torch_name, rel)


@pytest.mark.parametrize("layout", ["unrolled", "scanned"])
def test_hf_flax_hf_round_trip_gives_identical_logits(tmp_path, layout):
    hf_model, path = make_hf_model(tmp_path, seed=5)
    cfg, params = load(path, layout)
    out = str(tmp_path / "roundtrip")
    jamba_jax.save_hf_checkpoint(cfg, params, out, max_shard_bytes=30_000)  # forces several shards
    import transformers

    reloaded = transformers.JambaForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor(random_ids((2, 9), cfg.vocab_size, seed=5))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, hf_model(ids).logits, rtol=0, atol=0)
    sd_a, sd_b = hf_model.state_dict(), reloaded.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for k in sd_a:
        assert torch.equal(sd_a[k], sd_b[k]), k
