"""Builds the bundled English corpus from WordNet 3.0: one document per synset,
"<lemmas>: <gloss>", where the gloss is WordNet's definition followed by its example sentences.

  apt-get install wordnet-base && python -m data.build_corpus

Writes data/wordnet_corpus/{train,validation}.txt.gz (a deterministic 98/2 split by synset) and the
WordNet license beside them. The output is committed, so a pip-only install needs no WordNet.
"""

from __future__ import annotations

import os
import random

from common.files import write_gzip_text
from data.wordnet_files import POS_FILES, WORDNET_DIR, require_wordnet, synsets

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "wordnet_corpus")
LICENSE_SRC = "/usr/share/doc/wordnet-base/copyright"


def documents(wordnet_dir: str = WORDNET_DIR) -> list[str]:
    docs = []
    for pos in POS_FILES:
        for s in synsets(pos, wordnet_dir):
            words = ", ".join(w.split("(")[0].replace("_", " ") for w in s["words"])
            docs.append(f"{words}: {s['gloss']}")
    return docs


def main():
    require_wordnet()
    docs = documents()
    random.Random(0).shuffle(docs)
    n_val = len(docs) // 50
    os.makedirs(OUT_DIR, exist_ok=True)
    for name, part in (("validation", docs[:n_val]), ("train", docs[n_val:])):
        path = os.path.join(OUT_DIR, f"{name}.txt.gz")
        write_gzip_text(path, "\n".join(part) + "\n")
        print(f"{path}: {len(part)} documents, {os.path.getsize(path) / 2**20:.1f} MiB")
    with open(os.path.join(OUT_DIR, "LICENSE"), "w") as out:
        out.write("The files in this directory are derived from WordNet 3.0 (Princeton University),\n"
                  "built by data/build_corpus.py from Debian's wordnet-base package. WordNet's license:\n\n")
        out.write(open(LICENSE_SRC).read() if os.path.exists(LICENSE_SRC) else "WordNet 3.0 license: "
                  "https://wordnet.princeton.edu/license-and-commercial-use\n")


if __name__ == "__main__":
    main()
