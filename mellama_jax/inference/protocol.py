"""The OpenAI wire format: request bodies checked field by field, responses and stream chunks built.

A bad field is an `ApiError` naming it (400 and OpenAI's {"error": {message, type, param, code}} body), never a
traceback. Fields we do not know (`user`, `frequency_penalty` at its default, ...) are ignored, as vLLM does;
ones we know but cannot honour (`n` > 1, `best_of`, `suffix`, penalties) are refused by name.
"""

from __future__ import annotations

import dataclasses
import math
import time
import uuid
from typing import Any

MAX_STOP = 4  # OpenAI's limit on stop strings
NOT_SUPPORTED = ("best_of", "suffix", "tools", "functions", "response_format", "logit_bias")
NEUTRAL = {"presence_penalty": 0, "frequency_penalty": 0}  # accepted at these values only


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}  # fmt: skip
        error = {"message": self.message, "type": kind.get(self.status, "server_error"), "param": self.param}
        return {"error": {**error, "code": self.code}}


def bad(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param, code="invalid_value")


def _int(body: dict, name: str, default: int | None, low: int, high: int | None = None) -> int | None:
    value = body.get(name, default)
    if value is None:
        return default
    if type(value) is not int or value < low or (high is not None and value > high):
        span = f"an integer in {low}..{high}" if high is not None else f"an integer >= {low}"
        raise bad(name, f"must be {span}, got {value!r}")
    return value


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value > high or value < low or (low_open and value == low):
        raise bad(name, f"must be a number in {'(' if low_open else '['}{low}, {high}], got {value!r}")
    return float(value)


def _bool(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(name, f"must be true or false, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class Params:
    model: str
    max_tokens: int | None  # None: as many as the window leaves
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    logprobs: int | None  # completions: top alternatives per token (0..5); None = no logprobs
    echo: bool
    ignore_eos: bool  # vLLM's extension: generate max_tokens whatever the model says (benchmarks)


def params(body: Any, chat: bool) -> Params:
    """The sampling and output settings of a completions (`chat` False) or chat completions body."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    for name in NOT_SUPPORTED:
        if body.get(name) is not None:
            raise bad(name, "is not supported by this server")
    for name, neutral in NEUTRAL.items():
        if body.get(name) not in (None, neutral):
            raise bad(name, f"is not supported by this server (only {neutral})")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model", "must name a served model (GET /v1/models lists them)")
    _int(body, "n", 1, 1, 1)
    stop = body.get("stop")
    stop = () if stop is None else (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, (list, tuple)) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise bad("stop", f"must be a non-empty string or a list of up to {MAX_STOP} of them")
    options = body.get("stream_options")
    if options is not None and (
        not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool)
    ):
        raise bad("stream_options", 'must be an object like {"include_usage": true}')
    stream = _bool(body, "stream")
    if options is not None and not stream:
        raise bad("stream_options", "is only allowed with stream: true")
    top_k = _int(body, "top_k", 0, -1)
    echo = False if chat else _bool(body, "echo")
    if chat:
        if body.get("logprobs") or body.get("top_logprobs") is not None:
            raise bad("logprobs", "is not supported for chat completions; /v1/completions returns logprobs")
        logprobs = None
        max_tokens = _int(body, "max_completion_tokens", None, 1)
        max_tokens = _int(body, "max_tokens", max_tokens, 1)
    else:
        logprobs = _int(body, "logprobs", None, 0, 5)
        max_tokens = _int(body, "max_tokens", 16, 0 if echo else 1)  # 0 with echo: score the prompt only
    return Params(
        model=model,
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        top_k=max(top_k, 0),  # -1 (vLLM's "off") and 0 both mean off
        seed=_int(body, "seed", 0, 0, 2**31 - 1),
        stop=tuple(stop),
        stream=stream,
        include_usage=bool(options and options.get("include_usage")),
        logprobs=logprobs,
        echo=echo,
        ignore_eos=_bool(body, "ignore_eos"),
    )


def prompts(body: dict, encode, vocab: int) -> list[list[int] | str]:
    """A completions body's prompts: each a string (encoded with `encode`) or token ids, as OpenAI allows:
    a string, a list of strings, a list of ids, or a list of lists of ids."""
    value = body.get("prompt")
    if isinstance(value, str) or isinstance(value, list) and value and all(type(t) is int for t in value):
        value = [value]
    if not isinstance(value, list) or not value:
        raise bad("prompt", "must be a string, a list of strings, a list of token ids, or a list of such lists")
    out = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            item = encode(item)
        elif not (isinstance(item, list) and all(type(t) is int for t in item)):
            raise bad("prompt", f"item {i} must be a string or a list of token ids")
        if not item:
            raise bad("prompt", f"item {i} is empty")
        if min(item) < 0 or max(item) >= vocab:
            raise bad("prompt", f"item {i} has a token id outside the vocabulary (0..{vocab - 1})")
        out.append(item)
    return out


def messages(body: dict) -> list[dict]:
    """A chat body's messages, checked: each {role: system|user|assistant, content: string}."""
    value = body.get("messages")
    if not isinstance(value, list) or not value:
        raise bad("messages", "must be a non-empty list of {role, content} objects")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise bad(f"messages[{i}].role", "must be system, user or assistant")
        content = message.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
            ):
                raise bad(f"messages[{i}].content", "only text parts are supported")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise bad(f"messages[{i}].content", "must be a string")
        out.append({"role": message["role"], "content": content})
    return out


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class Envelope:
    """The id, created time and model shared by a response and all its stream chunks."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.model, self.created = chat, model, int(time.time())
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"

    def whole(self, choices: list[dict], usage_: dict) -> dict:
        kind = "chat.completion" if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices,
                "usage": usage_}  # fmt: skip

    def chunk(self, choices: list[dict], usage_: dict | None = None) -> dict:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        out = {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}
        return out if usage_ is None else {**out, "usage": usage_}

    def choice(self, index: int, text: str | None, finish: str | None, logprobs: dict | None = None,
               role: bool = False, whole: bool = False) -> dict:  # fmt: skip
        if not self.chat:
            return {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
        if whole:
            return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": finish}  # fmt: skip
        delta = ({"role": "assistant"} if role else {}) | ({"content": text} if text is not None else {})
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
