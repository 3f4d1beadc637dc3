"""Trains the default tokenizer: byte-level BPE, 2048 tokens, on the bundled corpus's train split.

  python -m data.build_tokenizer

Ids 0/1/2 are <pad>/<bos>/<eos>, matching Jamba's pad/bos/eos token ids. Writes
data/tokenizer/tokenizer.json (committed; loaded with the `tokenizers` library).
"""

from __future__ import annotations

import gzip
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "wordnet_corpus", "train.txt.gz")
OUT = os.path.join(HERE, "tokenizer", "tokenizer.json")
SPECIAL = ["<pad>", "<bos>", "<eos>"]


def main(vocab_size: int = 2048):
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


if __name__ == "__main__":
    main()
