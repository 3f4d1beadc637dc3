"""Chat templates: the Jinja templates tokenizers ship in tokenizer_config.json (`chat_template`), rendered
as transformers' `apply_chat_template` renders them (the same sandboxed Jinja environment: trim_blocks,
lstrip_blocks, loop controls, its `tojson`, `raise_exception`, `strftime_now`, `dict` and `namespace`; the
tokenizer's special tokens as variables), with the character spans of the `{% generation %}` blocks, from
which the assistant-token mask follows as transformers computes it (every token overlapping a span).

Roles: system, user, assistant and tool (a tool's answer); a message is {"role", "content"} plus what the
template reads (assistant "tool_calls", ...).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache

from common.errors import UserError

ROLES = ("system", "user", "assistant", "tool")


class ChatTemplateError(UserError):
    """A chat template that cannot render a conversation (a syntax error, or the template's own exception)."""


@lru_cache(maxsize=16)
def _compile(template: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTracker(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}`: records the character span of what the block renders."""

        tags = {"generation"}

        def __init__(self, environment):
            super().__init__(environment)
            environment.extend(track_generation=self.track)
            self._tracking = ContextVar("generation_tracker", default=None)

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_block"), [], [], body).set_lineno(lineno)

        def _block(self, caller):
            rendered = caller()
            if (tracking := self._tracking.get()) is not None:
                blocks, spans = tracking
                start = len("".join(blocks))
                spans.append((start, start + len(rendered)))
            return rendered

        @contextmanager
        def track(self, blocks, spans):
            token = self._tracking.set((blocks, spans))
            try:
                yield
            finally:
                self._tracking.reset(token)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTracker, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       dict=dict, namespace=jinja2.utils.Namespace)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template does not parse: {e} (line {e.lineno})") from e


def render(template: str, messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = False,
           **variables) -> tuple[str, list[tuple[int, int]]]:
    """(the rendered conversation, the [start, end) character spans of its `{% generation %}` blocks)."""
    import jinja2

    compiled = _compile(template)
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    blocks, spans = [], []
    try:
        with compiled.environment.track_generation(blocks, spans):
            for block in compiled.generate(messages=messages, tools=tools, documents=None,
                                           add_generation_prompt=add_generation_prompt, **variables):
                blocks.append(block)
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"the chat template refused the conversation: {e}") from e
    return "".join(blocks), spans


def token_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """1 for every token (by its character offsets) that overlaps a span, else 0: transformers' assistant mask."""
    mask, s = [0] * len(offsets), 0
    for i, (start, end) in enumerate(offsets):
        while s < len(spans) and start >= spans[s][1]:
            s += 1
        if s == len(spans):
            break
        if end > spans[s][0]:
            mask[i] = 1
    return mask
