"""Tokenizers of the causal LMs: a Hugging Face `tokenizer.json` or a SentencePiece `.model` behind one
small interface (ids of <bos>, <eos>, <pad>; encode, decode, offsets; conversations through the chat
template of the tokenizer_config.json beside it), the bundled 2048-token BPE (data/build_tokenizer.py, with
its default chat template) by default, and a streamer that prints generated text as it arrives. Training
data, generation and the encoders all read text through it."""

from __future__ import annotations

import json
import os
import sys

from common.chat_template import render, token_mask
from common.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLED_TOKENIZER = os.path.join(ROOT, "data", "tokenizer", "tokenizer.json")


class TokenizerError(UserError):
    """A tokenizer file that cannot be used (missing, malformed, too large for the model)."""


class TextTokenizer:
    """A HF `tokenizer.json` or a SentencePiece `.model` behind one small interface."""

    def __init__(self, path: str):
        if not os.path.exists(path):
            raise TokenizerError(f"tokenizer file {path} does not exist")
        self.path = path
        self._sp = self._hf = None
        self.chat_template, self.special_tokens = None, {}
        if path.endswith(".model"):
            import sentencepiece as spm

            self._sp = spm.SentencePieceProcessor(model_file=path)
            self.vocab_size = self._sp.get_piece_size()
            self.bos_id, self.eos_id, self.pad_id = self._sp.bos_id(), self._sp.eos_id(), max(self._sp.pad_id(), 0)
            return
        from tokenizers import Tokenizer

        try:
            self._hf = Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise TokenizerError(f"{path}: not a valid tokenizer.json ({e})") from e
        self.vocab_size = self._hf.get_vocab_size()
        ids = [self._hf.token_to_id(t) for t in ("<pad>", "<bos>", "<eos>")]
        self.pad_id = ids[0] if ids[0] is not None else 0
        self.bos_id = ids[1] if ids[1] is not None else self._hf.token_to_id("<s>")
        self.eos_id = ids[2] if ids[2] is not None else self._hf.token_to_id("</s>")
        self._read_config(os.path.join(os.path.dirname(os.path.abspath(path)), "tokenizer_config.json"))

    def _read_config(self, path: str) -> None:
        """The chat template and special tokens of a tokenizer_config.json beside the tokenizer (transformers')."""
        self.chat_template, self.special_tokens = None, {}
        if not os.path.exists(path):
            return
        try:
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        except json.JSONDecodeError as e:
            raise TokenizerError(f"{path}: not valid JSON ({e})") from e
        template = config.get("chat_template")
        if isinstance(template, list):  # several named templates: the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        self.chat_template = template
        for key, value in config.items():
            if key.endswith("_token") and isinstance(value, (str, dict)):
                self.special_tokens[key] = value["content"] if isinstance(value, dict) else value

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text) if self._sp is not None else self._hf.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """(ids, the [start, end) character span of each in `text`); HF tokenizers only."""
        if self._hf is None:
            raise TokenizerError(f"{self.path}: character offsets need a tokenizer.json, not a SentencePiece model")
        enc = self._hf.encode(text, add_special_tokens=False)
        return enc.ids, list(enc.offsets)

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = False,
                    template: str | None = None) -> tuple[list[int], list[int]]:
        """(token ids, assistant mask) of a conversation rendered with the chat template (the tokenizer's by
        default), as transformers' `apply_chat_template(..., tokenize=True, return_assistant_tokens_mask=True)`."""
        template = template or self.chat_template
        if template is None:
            raise TokenizerError(f"{self.path}: no chat template (a tokenizer_config.json with `chat_template` beside "
                                 "it); conversations need one")
        text, spans = render(template, messages, tools, add_generation_prompt, **self.special_tokens)
        ids, offsets = self.encode_with_offsets(text)
        return ids, token_mask(offsets, spans)

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        return self._sp.decode(ids) if self._sp is not None else self._hf.decode(ids)


def load_tokenizer(path: str | None, model_vocab_size: int, model: str = "",
                   field: str = "config.data.tokenizer") -> TextTokenizer:
    """The tokenizer at `path` ("" or None: the bundled BPE), refused when it has more tokens than the model
    (`model`: the checkpoint the model comes from, when it does; `field`: the setting that names a tokenizer)."""
    tok = TextTokenizer(path or BUNDLED_TOKENIZER)
    if tok.vocab_size > model_vocab_size:
        fix = (f"set {field} to the tokenizer.json {model} was trained with" if model else
               "raise config.model.vocab_size or use a smaller tokenizer")
        raise TokenizerError(f"tokenizer {tok.path} has {tok.vocab_size} tokens but the vocabulary of "
                             f"{model or 'the model'} has {model_vocab_size} (vocab_size); {fix}")
    return tok


def text_streamer(tokenizer, out=None):
    """A `jamba_jax.generate` callback that prints the text each new token of row 0 adds (EOS prints nothing)."""
    emitted: list[int] = []
    out = out or sys.stdout

    def stream(step, tokens):
        before = tokenizer.decode(emitted)
        if tokens[0] != tokenizer.eos_id:
            emitted.append(int(tokens[0]))
        out.write(tokenizer.decode(emitted)[len(before):])
        out.flush()

    return stream
