"""Trains the default tokenizer: byte-level BPE, 2048 tokens, on the bundled corpus's train split.

  python -m data.build_tokenizer [--config_only]

Ids 0/1/2 are <pad>/<bos>/<eos>, matching Jamba's pad/bos/eos token ids. Writes
data/tokenizer/tokenizer.json (committed; loaded with the `tokenizers` library) and tokenizer_config.json
beside it (its special tokens and the default chat template, CHAT_TEMPLATE, as transformers reads them:
AutoTokenizer loads the directory).

The default chat template: <bos>, then each message as a header line `<|role|>` and its content, an
assistant's content and <eos> inside a `{% generation %}` block (the tokens a chat fine-tuning trains on),
tools (when given) as JSON after a `<|tools|>` header, an assistant's tool calls as JSON, and with
add_generation_prompt the header of the assistant's turn. The roles are system, user, assistant and tool.
"""

from __future__ import annotations

import gzip
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "wordnet_corpus", "train.txt.gz")
OUT = os.path.join(HERE, "tokenizer", "tokenizer.json")
SPECIAL = ["<pad>", "<bos>", "<eos>"]
CONFIG_OUT = os.path.join(HERE, "tokenizer", "tokenizer_config.json")
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}<|tools|>\n{{ tools | tojson }}\n{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{ raise_exception('unknown role ' ~ message['role']) }}{% endif %}"
    "<|{{ message['role'] }}|>\n"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{% if message.get('content') %}{{ message['content'] }}{% endif %}"
    "{% if message.get('tool_calls') %}{{ message['tool_calls'] | tojson }}{% endif %}"
    "{{ eos_token }}{% endgeneration %}\n"
    "{% else %}{{ message['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def write_config():
    """tokenizer_config.json: the special tokens and the default chat template (module docstring)."""
    import json

    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>",
              "pad_token": "<pad>", "model_max_length": 262144, "chat_template": CHAT_TEMPLATE}
    with open(CONFIG_OUT, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


def main(vocab_size: int = 2048, config_only: bool = False):
    if config_only:
        return write_config()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        lines = f.read().splitlines()
    tok.train_from_iterator(lines, trainer=trainer)
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    tok.save(OUT)
    assert [tok.token_to_id(s) for s in SPECIAL] == [0, 1, 2]
    n = sum(len(e.ids) for e in tok.encode_batch(lines[:2000]))
    print(f"{OUT}: vocab {tok.get_vocab_size()}, {n / sum(len(x) for x in lines[:2000]):.3f} tokens/char")
    write_config()


if __name__ == "__main__":
    import sys

    main(config_only="--config_only" in sys.argv[1:])
