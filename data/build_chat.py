"""A small chat dataset from the bundled WordNet corpus, for trying chat fine-tuning on a CPU:

  python -m data.build_chat [--out_dir chat_data] [--train 4000] [--validation 200]

Each synset ("lemmas: definition; "example"; ...") becomes one conversation in OpenAI / Hugging Face
`messages` form: a system message, the user asking to define the first lemma, the assistant answering
with WordNet's definition and, when the synset has an example sentence, a second exchange asking for one.
Writes OUT_DIR/train.jsonl (from the corpus' train split) and OUT_DIR/validation.jsonl (its validation
split): `config.data.format = "chat"` reads them (README, "Fine-tuning"). Deterministic: the first
synsets of each split, in the corpus' order.
"""

from __future__ import annotations

import argparse
import json
import os

from common.files import atomic_write_text
from training.data import read_lines

CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "wordnet_corpus")
SYSTEM = "You define English words briefly, as a dictionary does."


def conversation(document: str) -> dict | None:
    """One synset document as a conversation (None when it has no definition to give)."""
    lemmas, _, gloss = document.partition(": ")
    parts = [p.strip() for p in gloss.split(";")]
    definition = parts[0] if parts else ""
    if not lemmas or not definition or definition.startswith('"'):
        return None
    word = lemmas.split(",")[0].strip()
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Define {word}."},
                {"role": "assistant", "content": definition[0].upper() + definition[1:] + "."}]
    examples = [p.strip('"') for p in parts[1:] if p.startswith('"') and p.endswith('"') and len(p) > 2]
    if examples:
        messages += [{"role": "user", "content": f"Use {word} in a sentence."},
                     {"role": "assistant", "content": examples[0]}]
    return {"messages": messages}


def build(split: str, count: int) -> str:
    """JSONL of the first `count` conversations of the corpus split."""
    rows = []
    for document in read_lines([os.path.join(CORPUS, f"{split}.txt.gz")], None):
        if len(rows) == count:
            break
        if (row := conversation(document)) is not None:
            rows.append(json.dumps(row, ensure_ascii=False))
    return "".join(r + "\n" for r in rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data.build_chat", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default="chat_data", help="directory to write train.jsonl and validation.jsonl")
    parser.add_argument("--train", type=int, default=4000, help="conversations in train.jsonl")
    parser.add_argument("--validation", type=int, default=200, help="conversations in validation.jsonl")
    args = parser.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    for split, count in (("train", args.train), ("validation", args.validation)):
        path = os.path.join(args.out_dir, f"{split}.jsonl")
        atomic_write_text(path, build(split, count))
        print(f"wrote {count} conversations to {path}")


if __name__ == "__main__":
    main()
