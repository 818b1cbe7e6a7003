"""`/v1/completions` and `/v1/chat/completions`: OpenAI's generation routes over a GenerationScheduler.

One HTTP request may hold several prompts (completions) and ask `n` choices of each; every choice is
its own engine request, all in the same continuous batch, and choice `i * n + j` is prompt i's j-th.
With `logprobs`, each new token comes with its log-probability and the top alternatives (OpenAI's
legacy shape for completions: `tokens`, `token_logprobs`, `top_logprobs`, `text_offset`; the chat
shape's `content` list for chat); `echo` returns the prompt before the completion, with its tokens'
log-probabilities when `logprobs` is set (the first token has none).
"""

import asyncio
import json
import time
import uuid
from dataclasses import dataclass

from starlette.responses import JSONResponse, Response, StreamingResponse

from zoo.errors import GenerationError, ZooError
from zoo.serving.protocol import (CHAT_FIELDS, COMPLETION_FIELDS, APIError, chat_messages, completion_prompts,
                                  sampling, usage)


@dataclass(eq=False)
class Choice:
    index: int
    ticket: object
    prompt_text: str | None  # what `echo` returns before the completion (None: no echo)
    text: str = ""
    finish: str | None = None


async def generate(server, request, chat: bool):
    body = await server.json_body(request)
    name, scheduler, adapter = server.model(body, "generate")
    params = sampling(body, CHAT_FIELDS if chat else COMPLETION_FIELDS, server.config.max_tokens or scheduler.length)
    tokenizer = scheduler.lm.tokenizer
    try:
        if chat:  # the users' special tokens' strings stay text: no forged turn markers
            prompts = [(tokenizer.apply_chat_template(chat_messages(body), add_generation_prompt=True, tokenize=True,
                                                      content_as_text=True), None)]
        else:
            prompts = completion_prompts(body, tokenizer)
    except (GenerationError, ZooError) as e:
        raise APIError(400, str(e), param="messages" if chat else "prompt") from None
    for ids, _ in prompts:
        total = len(ids) + params["max_tokens"]
        if total > scheduler.length:
            raise APIError(400, f"This model's maximum context length is {scheduler.length} tokens. However, you "
                                f"requested {total} tokens ({len(ids)} in the prompt, {params['max_tokens']} for the "
                                "completion). Please reduce the prompt or max_tokens.",
                           param="messages" if chat else "prompt", code="context_length_exceeded")
    choices = _submit(scheduler, prompts, params, tokenizer, adapter)
    server.metrics.prompt_tokens.labels(name).inc(sum(len(ids) for ids, _ in prompts))
    meta = dict(id=("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, created=int(time.time()), model=name,
                object="chat.completion" if chat else "text_completion")
    shape = Shape(tokenizer, chat, params["logprobs"], params["token_ids"])
    totals = lambda: usage([ids for ids, _ in prompts], [c.ticket for c in choices])  # noqa: E731
    if params["stream"]:
        return StreamingResponse(_stream(server, request, name, scheduler, choices, meta, shape, params, totals),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    try:
        await asyncio.gather(*(_collect(server, request, name, scheduler, c) for c in choices))
    except asyncio.TimeoutError:
        raise APIError(504, f"the request took longer than {server.config.request_timeout_s}s", "server_error",
                       code="timeout") from None
    if any(c.finish == "cancelled" for c in choices):  # the client went away; nobody reads this
        return Response(status_code=499)
    return JSONResponse({**meta, "choices": [shape.whole(c) for c in choices], "usage": totals()})


def _submit(scheduler, prompts, params, tokenizer, adapter: str | None) -> list[Choice]:
    """Every choice of every prompt queued, or none (a full queue, or a request the engine refuses)."""
    n, echo, logprobs = params["n"], params["echo"], params["logprobs"]
    scheduler.check_room(len(prompts) * n)
    stop_ids = () if params["ignore_eos"] else scheduler.lm.stop_token_ids
    choices = []
    try:
        for i, (ids, sent) in enumerate(prompts):
            for j in range(n):
                sampler = params["sampler"]
                if sampler.seed is not None and j:  # choice j of a seeded request: its own, reproducible draws
                    sampler = type(sampler)(**{**sampler.__dict__, "seed": sampler.seed + j})
                scored = logprobs if echo and logprobs is not None else 0 if params["max_tokens"] == 0 else None
                ticket = scheduler.submit(ids, params["max_tokens"], sampler, stop_ids, params["stop"], logprobs,
                                          scored, adapter)  # (max_tokens 0: the engine's prompt-only path)
                prompt_text = (sent if sent is not None else tokenizer.decode(ids)) if echo else None
                choices.append(Choice(i * n + j, ticket, prompt_text))
    except GenerationError as e:
        for c in choices:
            scheduler.cancel(c.ticket)
        raise APIError(400, str(e)) from None
    return choices


async def _collect(server, request, name, scheduler, choice: Choice) -> None:
    async for event in server.events(request, name, scheduler, choice.ticket):
        choice.text += event.text
        if event.finished:
            choice.finish = event.request.finish_reason


class Shape:
    """A choice as OpenAI's JSON: whole, or as stream chunks; log-probabilities in the route's shape."""

    def __init__(self, tokenizer, chat: bool, logprobs: int | None, token_ids: bool = False):
        self.tokenizer, self.chat, self.logprobs, self.token_ids = tokenizer, chat, logprobs, token_ids
        self.special = tokenizer.special_ids

    def piece(self, token: int) -> str:
        """A token's text, or "token_id:<id>" with vLLM's `return_tokens_as_token_ids`."""
        return f"token_id:{token}" if self.token_ids else self.tokenizer.decode([token], skip_special_tokens=False)

    def whole(self, c: Choice) -> dict:
        text = (c.prompt_text or "") + c.text
        scores = self.scores(c, 0, None, prompt=c.prompt_text is not None)
        if self.chat:
            return {"index": c.index, "message": {"role": "assistant", "content": text}, "finish_reason": c.finish,
                    "logprobs": scores}
        return {"index": c.index, "text": text, "finish_reason": c.finish, "logprobs": scores}

    def chunk(self, c: Choice, text: str | None, finish: str | None, scored: tuple[int, int] | None,
              role: bool = False, prompt: bool = False) -> dict:
        scores = self.scores(c, *scored, prompt=prompt) if scored else None
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
            return {"index": c.index, "delta": delta, "finish_reason": finish, "logprobs": scores}
        return {"index": c.index, "text": text or "", "finish_reason": finish, "logprobs": scores}

    @staticmethod
    def scored(c: Choice) -> int:
        """New tokens with log-probabilities so far, the end-of-sequence token that ended a choice left out (it is
        not part of the text)."""
        r = c.ticket.request
        done = len(r.token_scores)
        return done - 1 if done and r.finish_reason == "stop" and r.tokens[done - 1] in r.stop_ids else done

    def scores(self, c: Choice, start: int, end: int | None, prompt: bool = False):
        """The log-probabilities of new tokens [start, end), after the prompt's (the first has none) if `prompt`."""
        if self.logprobs is None:
            return None
        r = c.ticket.request
        pairs = list(zip(r.tokens, r.token_scores))[:self.scored(c)][start:end]
        if self.chat:
            return {"content": [self._chat_entry(t, lp, top) for t, (lp, top) in pairs], "refusal": None}
        entries = []
        if prompt:
            entries.append((r.prompt_ids[0], None, None))
            entries += [(t, lp, top) for t, (lp, top) in zip(r.prompt_ids[1:], r.prompt_scores)]
        entries += [(t, lp, top) for t, (lp, top) in pairs]
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        offset = 0
        for token, lp, top in entries:
            piece = self.piece(token)
            out["tokens"].append(piece)
            out["token_logprobs"].append(lp)
            out["top_logprobs"].append(None if top is None else {self.piece(i): v for i, v in top})
            out["text_offset"].append(offset)
            offset += 0 if token in self.special else len(self.tokenizer.decode([token]))
        return out

    def _chat_entry(self, token: int, lp: float, top: list) -> dict:
        piece = self.piece(token)
        return {"token": piece, "logprob": lp, "bytes": list(piece.encode("utf-8")),
                "top_logprobs": [{"token": self.piece(i), "logprob": v, "bytes": list(self.piece(i).encode("utf-8"))}
                                 for i, v in top]}


async def _stream(server, request, name, scheduler, choices, meta, shape: Shape, params, totals):
    chat = shape.chat
    obj = "chat.completion.chunk" if chat else "text_completion"
    started = min(c.ticket.submitted for c in choices)

    def sse(payload: dict) -> str:
        return "data: " + json.dumps({**meta, "object": obj, **payload}) + "\n\n"

    merged: asyncio.Queue = asyncio.Queue()

    async def feed(c: Choice):
        try:
            async for event in server.events(request, name, scheduler, c.ticket, streaming=True):
                await merged.put((c, event, None))
        except asyncio.TimeoutError as e:
            await merged.put((c, None, e))

    tasks = [asyncio.create_task(feed(c)) for c in choices]
    sent = {c.index: 0 for c in choices}  # new tokens whose log-probabilities have gone out
    try:
        if chat:
            for c in choices:
                yield sse({"choices": [shape.chunk(c, None, None, None, role=True)]})
        open_choices, echoed = len(choices), set()
        while open_choices:
            c, event, error = await merged.get()
            if error is not None:
                raise error
            if c.prompt_text is not None and c.index not in echoed:  # echo: the prompt first (scored once admitted)
                echoed.add(c.index)
                scored = (0, 0) if params["logprobs"] is not None else None
                yield sse({"choices": [shape.chunk(c, c.prompt_text, None, scored, prompt=True)]})
            done = shape.scored(c)
            if event.finished:
                open_choices -= 1
                reason = event.request.finish_reason
                if reason == "cancelled":
                    return
                if event.text:
                    yield sse({"choices": [shape.chunk(c, event.text, None, _span(sent, c, done, params))]})
                yield sse({"choices": [shape.chunk(c, None, reason, None)]})
            elif event.text or params["logprobs"] is not None:
                yield sse({"choices": [shape.chunk(c, event.text, None, _span(sent, c, done, params))]})
        if params["include_usage"]:
            yield sse({"choices": [], "usage": totals()})
        yield "data: [DONE]\n\n"
    except asyncio.TimeoutError:
        error = {"message": f"the request took longer than {server.config.request_timeout_s}s", "type": "server_error",
                 "param": None, "code": "timeout"}
        yield "data: " + json.dumps({"error": error}) + "\n\n"
        yield "data: [DONE]\n\n"
    finally:
        for task in tasks:
            task.cancel()
        for c in choices:
            if not c.ticket.request.finished:
                scheduler.cancel(c.ticket)
        server.metrics.latency.labels("/v1/chat/completions" if chat else "/v1/completions").observe(
            time.perf_counter() - started)


def _span(sent: dict, c: Choice, done: int, params) -> tuple[int, int] | None:
    """The new tokens' log-probabilities not yet sent, marked as sent."""
    if params["logprobs"] is None:
        return None
    span = (sent[c.index], done)
    sent[c.index] = done
    return span
