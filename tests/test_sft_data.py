"""Chat and instruction data: conversations rendered and masked exactly as transformers' apply_chat_template
renders them (the bundled default template and a Jamba-style one with system, tools and tool messages), and
records turned into token ids and loss weights, bad ones named by file and line."""

import os

import pytest

from common.tokenizers import load_tokenizer
from training.data import DataError
from training.sft_data import encode_record

JAMBA_STYLE = (  # a Jamba-1.5-like template with system, tools and tool messages, generation blocks marked
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}<|bom|><|system|> {{ messages[0]['content'] }}<|eom|>"
    "{% set rest = messages[1:] %}{% else %}{% set rest = messages %}{% endif %}"
    "{% if tools %}<|bom|><|system|><tools>{{ tools | tojson }}</tools><|eom|>{% endif %}"
    "{% for m in rest %}{% if m['role'] == 'user' %}<|bom|><|user|> {{ m['content'] }}<|eom|>"
    "{% elif m['role'] == 'tool' %}<|bom|><|tool|> {{ m['content'] }}<|eom|>"
    "{% elif m['role'] == 'assistant' %}<|bom|><|assistant|>{% generation %} {{ m['content'] }}"
    "{% if m.get('tool_calls') %}<tool_calls>{{ m['tool_calls'] | tojson }}</tool_calls>{% endif %}<|eom|>"
    "{% endgeneration %}{% else %}{{ raise_exception('unknown role ' ~ m['role']) }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|bom|><|assistant|>{% endif %}")
CONVERSATIONS = [
    [{"role": "user", "content": "What is a dog?"}, {"role": "assistant", "content": "A domesticated canine."}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Define river; then stone."},
     {"role": "assistant", "content": "A large natural stream."}, {"role": "user", "content": "And stone?"},
     {"role": "assistant", "content": "Hard mineral matter, é."}],
    [{"role": "system", "content": "You may call tools."}, {"role": "user", "content": "Weather in Paris?"},
     {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
         "name": "weather", "arguments": {"city": "Paris"}}}]},
     {"role": "tool", "content": "{\"temp\": 21}"}, {"role": "assistant", "content": "21 degrees."}],
]
TOOLS = [{"type": "function", "function": {"name": "weather", "description": "Current weather",
                                           "parameters": {"type": "object", "properties": {"city": {
                                               "type": "string"}}}}}]


@pytest.mark.parametrize("template", ["bundled", "jamba_style"])
def test_chat_ids_and_assistant_masks_equal_transformers(template):
    from transformers import AutoTokenizer

    tok = load_tokenizer("", 2048)
    hf = AutoTokenizer.from_pretrained(os.path.dirname(tok.path))
    chat_template = None if template == "bundled" else JAMBA_STYLE
    for messages in CONVERSATIONS:
        tools = TOOLS if messages[0]["content"].startswith("You may") else None
        ids, mask = tok.encode_chat(messages, tools, template=chat_template)
        want = hf.apply_chat_template(messages, tools=tools, chat_template=chat_template, tokenize=True,
                                      return_dict=True, return_assistant_tokens_mask=True)
        assert ids == list(want["input_ids"]) and mask == list(want["assistant_masks"]), template
        assert 0 < sum(mask) < len(mask)
    prompt_ids, _ = tok.encode_chat(CONVERSATIONS[0][:1], add_generation_prompt=True, template=chat_template)
    assert prompt_ids == list(hf.apply_chat_template(CONVERSATIONS[0][:1], chat_template=chat_template,
                                                     add_generation_prompt=True, tokenize=True, return_dict=True)[
        "input_ids"])


def test_records_become_ids_and_weights_and_bad_ones_are_named():
    tok = load_tokenizer("", 2048)
    ids, w = encode_record(tok, {"messages": CONVERSATIONS[1]}, "f:1", "chat", "assistant")
    assert len(ids) == len(w) and 0 < sum(w) < len(w)
    ids_all, w_all = encode_record(tok, {"messages": CONVERSATIONS[1]}, "f:1", "chat", "all")
    assert ids_all == ids and set(w_all) == {1.0}
    ids, w = encode_record(tok, {"prompt": "dog:", "completion": " a canine"}, "f:2", "prompt_completion", "assistant")
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and w[0] == 0 and w[-1] == 1
    assert tok.decode([i for i, x in zip(ids, w, strict=True) if x][:-1]) == " a canine"
    for record, needle in (({"messages": [{"role": "bot", "content": "x"}]}, "f:3: message 0 has role 'bot'"),
                           ({"messages": [{"role": "user", "content": "x"}]}, "f:3: the conversation has no assistant"),
                           ({"text": "x"}, "f:3: 'messages' must be a non-empty list")):
        with pytest.raises(DataError, match=needle):
            encode_record(tok, record, "f:3", "chat", "assistant")


def test_packed_rows_keep_each_records_weights_beside_its_tokens(tmp_path):
    """Every packed segment is one whole record: its ids and its loss weights, in order, padding weighted 0."""
    import json

    from ml_collections import ConfigDict

    from training.data import make_iterator
    from training.sft_data import sft_dataset, sft_examples

    tok = load_tokenizer("", 2048)
    rows = [{"messages": [{"role": "user", "content": f"Define word {i}."},
                          {"role": "assistant", "content": "A word" + " and more" * (i % 5) + "."}]} for i in range(40)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = ConfigDict({"source": "jsonl", "format": "chat", "train_files": str(tmp_path / "c.jsonl"),
                       "validation_files": str(tmp_path / "c.jsonl"), "train_on": "assistant",
                       "overlong": "truncate", "encoding_errors": "strict"})
    examples = sft_examples(data, tok, "train", 64)
    by_ids = {tuple(e["inputs"].tolist()): e["weights"].tolist() for e in examples}
    batch = next(make_iterator(sft_dataset(examples, batch_size=4, seq_len=64, seed=0, train=True)))
    seen = 0
    for ids, seg, w in zip(batch["inputs"], batch["segment_ids"], batch["weights"], strict=True):
        assert (w[seg == 0] == 0).all()
        for s in set(seg.tolist()) - {0}:
            key = tuple(ids[seg == s].tolist())
            assert key in by_ids and w[seg == s].tolist() == by_ids[key]  # a whole record, weights aligned
            seen += 1
    assert seen > 4  # several records share a row
