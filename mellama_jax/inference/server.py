"""`mellama serve`'s HTTP side: OpenAI's /v1/completions and /v1/chat/completions (streamed as server-sent
events or whole), /v1/models, /health and /metrics, on FastAPI, in front of one `engine.Engine`.

Each prompt becomes an engine request whose events come back to the event loop through a queue; text is
released as `TextStream` settles it. A client that goes away cancels its requests (their slots are free at
the next step). Prompt and completion text are never logged: only counts, times and statuses.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import threading
import time
import traceback

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from mellama_jax.inference import engine as engine_lib
from mellama_jax.inference import protocol
from mellama_jax.inference.metrics import Metrics
from mellama_jax.inference.protocol import ApiError, Envelope, Params
from mellama_jax.inference.textstream import TextStream

log = logging.getLogger(__name__)

MAX_BODY = 4 << 20  # bytes: a batch of long token-id prompts (lm-eval) fits; an accident does not
DISCONNECT_POLL = 0.5  # seconds between checks that a non-streaming client is still there


@dataclasses.dataclass
class State:
    engine: engine_lib.Engine
    tokenizer: object
    models: dict  # served name -> {"adapter": int, "card": /v1/models entry}
    chat: object  # messages -> token ids
    api_key: str | None
    metrics: Metrics
    ready: threading.Event = dataclasses.field(default_factory=threading.Event)
    failed: str | None = None  # why warm-up failed


class _Choice:
    """One prompt's request in flight and what it has produced so far."""

    def __init__(self, state: State, index: int, prompt: list[int], p: Params, emit):
        self.index, self.prompt, self.p = index, prompt, p
        self.stream = TextStream(state.tokenizer.decode, p.stop, prompt if p.echo else ())
        self.decode_one = lambda t: state.tokenizer.decode([t])
        self.tokens = 0
        self.finish: str | None = None
        self.logprobs = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        self.offset = 0
        self.request = engine_lib.Request(
            prompt, p.max_tokens, emit, p.temperature, p.top_k, p.top_p, p.seed,
            state.models[p.model]["adapter"], echo=p.echo and p.logprobs is not None, ignore_eos=p.ignore_eos,
        )  # fmt: skip

    def _add_logprobs(self, ids, chosen, top_ids, top_lp) -> dict:
        """Appends entries for `ids` (chosen log-probs None for a first prompt token) and returns them alone."""
        part = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for i, token in enumerate(ids):
            text = self.decode_one(token)
            top = None
            if chosen[i] is not None:
                alternatives = zip(top_ids[i][: self.p.logprobs], top_lp[i][: self.p.logprobs], strict=True)
                top = {self.decode_one(t): float(v) for t, v in alternatives}
            for key, value in (("tokens", text), ("token_logprobs", chosen[i]), ("top_logprobs", top),
                               ("text_offset", self.offset)):  # fmt: skip
                part[key].append(value)
                self.logprobs[key].append(value)
            self.offset += len(text)
        return part

    def on_event(self, event: tuple) -> tuple[str, dict | None]:
        """(text released, logprobs of it or None) for one engine event; sets `finish` on the last one."""
        kind = event[0]
        if kind == "prompt":  # echo with logprobs: the prompt's own entries, its first token has none
            _, logp, top_ids, top_lp = event
            chosen = [None] + [float(x) for x in logp]
            return "", self._add_logprobs(self.prompt, chosen, [None, *top_ids], [None, *top_lp])
        if kind == "token":
            _, token, logp, top_ids, top_lp = event
            self.tokens += 1
            text = self.stream.push(token)
            part = self._add_logprobs([token], [logp], [top_ids], [top_lp]) if self.p.logprobs is not None else None
            return text, part
        if kind == "error":
            raise ApiError(500, event[1], code="engine_error")
        self.finish = "stop" if self.stream.stopped or event[1] == "stop" else "length"
        return self.stream.finish(), None


async def _read_json(request: Request):
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
        raise ApiError(413, f"the request body is larger than {MAX_BODY} bytes", code="body_too_large")
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > MAX_BODY:
            raise ApiError(413, f"the request body is larger than {MAX_BODY} bytes", code="body_too_large")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({getattr(e, 'msg', 'not UTF-8')})",
                       code="invalid_json") from None  # fmt: skip


def _fit(state: State, prompt: list[int], p: Params, field: str) -> Params:
    """`p` with max_tokens set, once the prompt and max_tokens are known to fit the context window."""
    window = state.engine.max_len
    if len(prompt) >= window + (p.echo and p.max_tokens == 0):
        raise protocol.bad(field, f"{len(prompt)} tokens: no room left in the context window of {window} tokens")
    max_tokens = window - len(prompt) if p.max_tokens is None else p.max_tokens
    if len(prompt) + max_tokens > window:
        raise protocol.bad("max_tokens", f"{max_tokens} + the prompt's {len(prompt)} tokens exceed the context"
                                         f" window of {window} tokens")  # fmt: skip
    return dataclasses.replace(p, max_tokens=max_tokens)


async def _run(state: State, http: Request, prompts: list[list[int]], ps: list[Params]):
    """Yields (choice, text, logprobs part) as the engine produces; cancels everything if the caller stops."""
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()

    def emitter(i):
        def emit(event):
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting
                loop.call_soon_threadsafe(queue.put_nowait, (i, event))

        return emit

    choices = [_Choice(state, i, prompt, p, emitter(i)) for i, (prompt, p) in enumerate(zip(prompts, ps, strict=True))]
    began, first = time.monotonic(), [None] * len(choices)
    submitted = []
    try:
        for choice in choices:
            state.engine.submit(choice.request)
            submitted.append(choice)
        open_ = len(choices)
        while open_:
            try:
                i, event = await asyncio.wait_for(queue.get(), DISCONNECT_POLL)
            except asyncio.TimeoutError:
                if await http.is_disconnected():
                    return
                continue
            choice = choices[i]
            if choice.finish is not None:
                continue
            text, part = choice.on_event(event)
            if event[0] == "token":
                first[i] = first[i] or time.monotonic()
                state.metrics.tokens(1)
                if choice.stream.stopped:
                    state.engine.cancel(choice.request)
                    choice.finish = "stop"
            if choice.finish is not None:
                open_ -= 1
                state.metrics.request_done(choice.finish, len(choice.prompt), choice.tokens, began, first[i])
            yield choice, text, part
    except engine_lib.QueueFull:
        raise ApiError(429, "the server's queue is full; retry later", code="queue_full") from None
    finally:  # the client left (or a sibling failed): free the slots of what is still running
        for choice in submitted:
            if choice.finish is None:
                state.engine.cancel(choice.request)
                choice.finish = "cancelled"
                state.metrics.request_done("cancelled", len(choice.prompt), choice.tokens, began, first[choice.index])


def _sse(payload) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def build_app(state: State) -> FastAPI:
    app = FastAPI(title="mellama serve", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(_, e: ApiError):
        state.metrics.error(e.status)
        headers = {"Retry-After": "1"} if e.status == 429 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(_, e: HTTPException):
        return await api_error(
            _, ApiError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None)
        )

    @app.exception_handler(Exception)
    async def internal(_, e: Exception):  # the type and where, never the message (it may quote a prompt)
        log.error("internal error %s at %s", type(e).__name__, "".join(traceback.format_tb(e.__traceback__)[-3:]))
        return await api_error(_, ApiError(500, "internal server error", code="internal_error"))

    def check(http: Request) -> None:
        if state.api_key is not None:
            given = http.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {state.api_key}".encode()):
                raise ApiError(401, "a valid API key is required (Authorization: Bearer KEY)", code="invalid_api_key")
        if not state.ready.is_set():
            raise ApiError(503, "the model is still loading; GET /health turns 200 when it is ready", code="loading")

    def model_of(p: Params) -> None:
        if p.model not in state.models:
            raise ApiError(404, f"model {p.model!r} is not served here (GET /v1/models lists them)", param="model",
                           code="model_not_found")  # fmt: skip

    @app.get("/health")
    async def health():
        if state.failed:
            return JSONResponse({"status": "failed", "reason": state.failed}, status_code=503)
        ready = state.ready.is_set()
        return JSONResponse({"status": "ok" if ready else "loading"}, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(state.metrics.render(state.engine.queued(), state.engine.busy()),
                                 media_type="text/plain; version=0.0.4")  # fmt: skip

    @app.get("/v1/models")
    async def models(http: Request):
        check(http)
        return {"object": "list", "data": [m["card"] for m in state.models.values()]}

    async def parsed(http: Request, chat: bool) -> tuple[dict, Params]:
        """The request's body and settings, once the key, the body and the model are checked."""
        check(http)
        body = await _read_json(http)
        p = protocol.params(body, chat=chat)
        model_of(p)
        return body, p

    @app.post("/v1/completions")
    async def completions(http: Request):
        body, p = await parsed(http, chat=False)
        prompts = protocol.prompts(body, state.tokenizer.encode, state.engine.model.cfg.vocab_size)
        echo = [state.tokenizer.decode(ids) if p.echo else "" for ids in prompts]
        return await _answer(state, http, prompts, p, False, echo)

    @app.post("/v1/chat/completions")
    async def chat(http: Request):
        body, p = await parsed(http, chat=True)
        return await _answer(state, http, [state.chat(protocol.messages(body))], p, True, [""])

    return app


async def _answer(state: State, http: Request, prompts, p: Params, chat: bool, echo: list[str]):
    ps = [_fit(state, prompt, p, "messages" if chat else "prompt") for prompt in prompts]
    env = Envelope(chat, p.model)
    if not p.stream:
        texts, done = list(echo), {}
        async for choice, text, _ in _run(state, http, prompts, ps):
            texts[choice.index] += text
            done[choice.index] = choice
        if len(done) < len(prompts) or any(c.finish is None for c in done.values()):
            return JSONResponse({}, status_code=499)  # the client left
        choices = [done[i] for i in range(len(prompts))]
        logprobs = lambda c: c.logprobs if c.p.logprobs is not None else None  # noqa: E731
        body = [env.choice(c.index, texts[c.index], c.finish, logprobs(c), whole=True) for c in choices]
        used = protocol.usage(sum(map(len, prompts)), sum(c.tokens for c in choices))
        return JSONResponse(env.whole(body, used))
    events = _run(state, http, prompts, ps)
    # The queue may refuse at once: that must be a 429, before the 200 of a stream is sent.
    try:
        head = await events.__anext__()
    except StopAsyncIteration:
        head = None

    async def sse():
        seen = {}
        try:
            for i, text in enumerate(echo):
                if chat:
                    yield _sse(env.chunk([env.choice(i, "", None, role=True)]))
                elif text:
                    yield _sse(env.chunk([env.choice(i, text, None)]))
            pending = [head] if head is not None else []
            while True:
                item = pending.pop() if pending else await events.__anext__()
                choice, text, part = item
                seen[choice.index] = choice
                if text or part:
                    yield _sse(env.chunk([env.choice(choice.index, text, None, part)]))
                if choice.finish is not None:
                    yield _sse(env.chunk([env.choice(choice.index, None if chat else "", choice.finish)]))
        except StopAsyncIteration:
            pass
        except ApiError as e:  # after the 200: the error goes in the stream, as OpenAI's client reads it
            yield _sse(e.body())
        finally:
            await events.aclose()
        if p.include_usage:
            used = protocol.usage(sum(map(len, prompts)), sum(c.tokens for c in seen.values()))
            yield _sse(env.chunk([], used))
        yield "data: [DONE]\n\n"

    return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
