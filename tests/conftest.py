"""Shared fixtures: small random transformers Jamba checkpoints saved with `save_pretrained`, and for
fine-tuning one with the bundled tokenizer beside it and a chat file."""

import gzip
import json
import os
import shutil
import tempfile

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One persistent XLA compilation cache for the run, shared by both pytest-xdist workers and every
# subprocess a test starts (they inherit the environment): the suite compiles the same small training
# and generation programs many times over, and XLA's CPU compiles dominate its time. Size-capped,
# which also makes jax lock the directory between processes.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"jamba-jax-tests-xla-cache-{os.getuid()}"))
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 * 2**30))

import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from common.tokenizers import BUNDLED_TOKENIZER  # noqa: E402

SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=40, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, attn_layer_period=2, attn_layer_offset=1,
             expert_layer_period=2, expert_layer_offset=0, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2,
             mamba_dt_rank=4)


def perturb_(model, seed=0):
    """Moves A_log, D, norms and biases away from their init so parity is not trivially easy."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("A_log", ".D", "norm.weight", "layernorm.weight", ".bias")):
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
            elif "router" in name:
                p.mul_(20.0)  # sharper routing: top-k choices far from ties


def make_hf_model(tmp_path, seed=0, **overrides):
    """A randomly initialised, perturbed transformers JambaForCausalLM saved to tmp_path/hf."""
    torch.manual_seed(seed)
    hf_cfg = transformers.JambaConfig(**{**SMALL, **overrides})
    model = transformers.JambaForCausalLM(hf_cfg).eval()
    perturb_(model, seed)
    path = str(tmp_path / "hf")
    model.save_pretrained(path)
    return model, path


def random_ids(shape, vocab, seed=0):
    return np.random.RandomState(seed).randint(3, vocab, shape).astype(np.int64)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A checkpoint transformers wrote (the bundled tokenizer's vocabulary), with that tokenizer (and its chat
    template) beside it."""
    model, path = make_hf_model(tmp_path_factory.mktemp("hf"), seed=3, vocab_size=2048)
    with torch.no_grad():  # logits of std ~1, not ~0.1: a final norm before lm_head bounds the logits by lm_head's
        model.lm_head.weight.mul_(10.0)  # scale, and at init no adapter could move the loss far from ln(vocab)
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(os.path.join(os.path.dirname(BUNDLED_TOKENIZER), name), os.path.join(path, name))
    return model, path


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    """Definitions as a conversation each, from the bundled corpus ("lemma: definition; examples")."""
    with gzip.open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "wordnet_corpus",
                                "validation.txt.gz"), "rt") as f:
        docs = [d for d in f.read().splitlines() if ": " in d][:200]
    rows = [{"messages": [{"role": "user", "content": f"Define {d.split(': ')[0].split(',')[0]}."},
                          {"role": "assistant", "content": d.split(": ", 1)[1].split(";")[0]}]} for d in docs]
    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)
