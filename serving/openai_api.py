"""The OpenAI API's request bodies (pydantic: what the official client sends) and response bodies
(completions, chat completions, their stream chunks, errors), for `serving.server`.

Parameters the engine does not implement (n > 1, logprobs, echo, penalties, best_of) are refused with a
400 naming them rather than ignored. `top_k`, `stop_token_ids` and `ignore_eos` are accepted as vLLM
accepts them (the client's `extra_body`).
"""

from __future__ import annotations

import time
import uuid

from pydantic import BaseModel, ConfigDict

from serving.sampling import RequestError, SamplingParams


class _Sampled(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1
    stream: bool = False
    stream_options: dict | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: bool | int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        """The engine's SamplingParams; RequestError for what it does not implement."""
        unsupported = {"n": self.n != 1, "logprobs": bool(self.logprobs),
                       "presence_penalty": self.presence_penalty != 0, "frequency_penalty": self.frequency_penalty != 0}
        for name, bad in unsupported.items():
            if bad:
                raise RequestError(f"{name}={getattr(self, name)!r} is not supported by this server", name)
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(max_tokens=self.max_tokens if self.max_tokens is not None else default_max_tokens,
                              temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=self.seed,
                              stop=tuple(stop), stop_token_ids=tuple(self.stop_token_ids or ()),
                              ignore_eos=self.ignore_eos)

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Sampled):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    best_of: int | None = None

    def prompt_ids(self, tokenizer) -> list[int]:
        """One prompt: text (after <bos>, as generation reads it) or token ids."""
        if self.echo:
            raise RequestError("echo=true is not supported by this server", "echo")
        if self.best_of not in (None, 1):
            raise RequestError(f"best_of={self.best_of} is not supported by this server", "best_of")
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise RequestError(f"one prompt per request, got {len(p)}", "prompt")
            p = p[0]
        if isinstance(p, str):
            return ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + tokenizer.encode(p)
        return list(p)


class ChatRequest(_Sampled):
    messages: list[dict]
    tools: list[dict] | None = None
    max_completion_tokens: int | None = None

    def prompt_ids(self, tokenizer) -> list[int]:
        """The conversation in the tokenizer's chat template, the assistant's turn opened."""
        if not self.messages:
            raise RequestError("messages is empty", "messages")
        messages = []
        for m in self.messages:
            if "role" not in m:
                raise RequestError("every message needs a role", "messages")
            content = m.get("content")
            if isinstance(content, list):  # content parts: the text ones
                content = "".join(part.get("text", "") for part in content if part.get("type") == "text")
            messages.append({**m, "content": content or ""})
        try:
            return tokenizer.encode_chat(messages, self.tools, add_generation_prompt=True)[0]
        except Exception as e:  # the template's own errors (raise_exception in Jinja, a role it refuses)
            raise RequestError(f"the chat template cannot render these messages: {e}", "messages") from e

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        if self.max_completion_tokens is not None and self.max_tokens is None:
            self.max_tokens = self.max_completion_tokens
        return super().sampling(default_max_tokens)


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def usage(request) -> dict:
    prompt, completion = len(request.prompt_ids), len(request.output_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class Responses:
    """Builds one request's response bodies (ids and timestamps fixed at creation)."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.model = chat, model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _wrap(self, choices: list, chunk: bool, **extra) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices,
                **extra}

    def full(self, request) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": request.text},
                      "finish_reason": request.finish_reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": request.text, "finish_reason": request.finish_reason, "logprobs": None}
        return self._wrap([choice], False, usage=usage(request))

    def chunk(self, text: str, finish_reason: str | None = None, first: bool = False, request=None) -> dict:
        """A stream chunk; the last one (with its finish reason) carries the usage."""
        if self.chat:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
        extra = {"usage": usage(request)} if request is not None else {}
        return self._wrap([choice], True, **extra)

    def usage_chunk(self, request) -> dict:
        """OpenAI's stream_options.include_usage: a last chunk with no choices and the usage."""
        return self._wrap([], True, usage=usage(request))
