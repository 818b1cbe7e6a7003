"""The generation engine: a fixed set of slots sharing one compiled decode step.

A request waits until a slot is free, is prefilled at the next step (prompts admitted together
batched, right-padded to a length bucket) and joins the running batch; it leaves on a stop rule
or when cancelled. Each slot attends only to its own cache row, so a request's tokens do not
depend on its neighbours. Requests take the lowest free slots, and a step decodes only the rows
up to the highest busy one (rounded up to a power of two): a lone request costs a batch-1 step.

The engine needs the model's `prefill`, `decode` and `empty_cache` (see GemmaCausalLM), run
compiled (`zoo.generation.steps`); with `model.tokenizer` it also makes text and honours stop strings.
A model serving several adapters (`zoo.lora.bank`) runs requests for any of them, and for the base,
in the same batch: each row passes its adapter's slot to the steps.
"""

import collections
import contextlib
import itertools
import threading
import time
from dataclasses import dataclass, field

import numpy as np
from keras import ops

from zoo.errors import GenerationError, ZooError
from zoo.generation import samplers, steps
from zoo.generation.samplers import Sampler
from zoo.generation.text import TextStream
from zoo.lora import bank as adapter_bank

MIN_BUCKET = 16
MAX_ENGINES = 4  # engine shapes (slots x positions) kept per model, each with its KV cache; the oldest goes first


def bucket(n: int, cap: int | None = None) -> int:
    """The power of two (at least 16) that holds n, at most cap."""
    size = max(MIN_BUCKET, 1 << (max(n, 1) - 1).bit_length())
    return min(size, cap) if cap else size


_ids = itertools.count(1)


@dataclass(eq=False)
class Request:
    """One prompt's generation, and its progress."""

    prompt_ids: list[int]
    max_new_tokens: int
    sampler: Sampler = field(default_factory=Sampler)
    stop_ids: frozenset[int] = frozenset()
    stop: tuple[str, ...] = ()
    id: int = field(default_factory=lambda: next(_ids))
    tokens: list[int] = field(default_factory=list)
    text: str = ""  # the generated text so far, stop strings removed
    finish_reason: str | None = None  # "stop", "length" or "cancelled"
    created: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    slot: int | None = None
    cancelled: bool = False
    logprobs: int | None = None  # per new token: its log-probability and this many alternatives (None: off)
    prompt_logprobs: int | None = None  # the same for each prompt token after the first (None: off)
    token_scores: list = field(default_factory=list)  # per new token: (log-probability, [(id, logprob), ...])
    prompt_scores: list = field(default_factory=list)  # per prompt token after the first, likewise
    adapter: str | None = None  # the served adapter it runs with (None: the base model)
    adapter_slot: int = 0  # that adapter's slot in the model's bank, held from enqueue until it finishes

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def position(self) -> int:
        """Position of the last token, the one the next decode step feeds."""
        return len(self.prompt_ids) + len(self.tokens) - 1


def make_request(model, prompt_ids, max_new_tokens, sampler: Sampler | None = None, stop_ids=(), stop=(),
                 logprobs: int | None = None, prompt_logprobs: int | None = None, adapter: str | None = None) -> Request:
    """A request for `model`, every argument checked here, once: a GenerationError says what is wrong.

    `logprobs` and `prompt_logprobs` (ints >= 0) ask for log-probabilities of the new tokens and of the
    prompt's (with that many alternatives each); scoring the prompt alone is `max_new_tokens=0`.
    `adapter` names one of the adapters the model serves (`zoo.lora.bank`)."""
    for name, value in (("logprobs", logprobs), ("prompt_logprobs", prompt_logprobs)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise GenerationError(f"{name} must be an int >= 0 or None, got {value!r}")
    least = 0 if prompt_logprobs is not None else 1
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < least:
        raise GenerationError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    prompt_ids = [int(i) for i in prompt_ids]
    if not prompt_ids:
        raise GenerationError("the prompt is empty; give some text (at least one token) to continue")
    vocab, limit = model.config.vocab_size, model.config.max_position_embeddings
    outside = [i for i in prompt_ids if not 0 <= i < vocab]
    if outside:  # an embedding lookup would fail on some backends and clamp on others (JAX)
        raise GenerationError(f"the prompt holds token ids outside the model's vocabulary of {vocab}: {outside[:5]}")
    if len(prompt_ids) >= limit:
        raise GenerationError(f"the prompt has {len(prompt_ids)} tokens; the model's maximum is {limit} positions")
    if adapter is not None:
        served = adapter_bank.of(model)
        if served is None:
            raise GenerationError(f"adapter {adapter!r}: this model serves no adapters (zoo.lora.bank.AdapterBank)")
        if adapter not in served.names():
            raise GenerationError(f"no adapter named {adapter!r}; this model serves {served.names() or 'none'}")
    request = Request(prompt_ids, max_new_tokens, sampler or Sampler(), frozenset(stop_ids), tuple(stop),
                      logprobs=logprobs, prompt_logprobs=prompt_logprobs, adapter=adapter)
    if request.stop and model.tokenizer is None:
        raise GenerationError("stop strings need a tokenizer; this model has none (use stop token ids)")
    return request


def engine_for(model, rows: int, length: int) -> "GenerationEngine":
    """The model's engine over `rows` slots of `length` positions, reused while its shape is asked for."""
    engines = steps.state(model).engines
    if (rows, length) not in engines:
        if len(engines) >= MAX_ENGINES:
            engines.pop(next(iter(engines)))
        engines[rows, length] = GenerationEngine(model, rows, length)
    return engines[rows, length]


@dataclass
class Event:
    """What one step produced for one request: a token and the text it made certain."""

    request: Request
    token_id: int | None
    text: str
    finished: bool


class GenerationEngine:
    """Continuous batching over `rows` slots of up to `length` positions each.

    Example:
        >>> engine = GenerationEngine(lm, rows=4, length=256)  # doctest: +SKIP
        >>> request = engine.submit(lm.tokenizer.encode("def "), max_new_tokens=8)  # doctest: +SKIP
        >>> while not request.finished:  # doctest: +SKIP
        ...     engine.step()
    """

    def __init__(self, model, rows: int, length: int):
        self.model, self.rows, self.length = model, rows, length
        self.tokenizer = model.tokenizer
        self.steps = steps.state(model).steps
        self.cache = model.empty_cache(rows, length)
        self.slots: list[Request | None] = [None] * rows
        self.waiting: collections.deque[Request] = collections.deque()
        self._streams: dict[int, tuple[TextStream, np.random.Generator]] = {}
        self._bank_version = None  # the served adapters' banks the steps were made with
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ requests

    def submit(self, prompt_ids, max_new_tokens: int, sampler: Sampler | None = None, stop_ids=(), stop=(),
               logprobs: int | None = None, prompt_logprobs: int | None = None, adapter: str | None = None) -> Request:
        """Queues a request (checked by `make_request`); it joins the batch at the next step with a free slot."""
        return self.enqueue(make_request(self.model, prompt_ids, max_new_tokens, sampler, stop_ids, stop, logprobs,
                                         prompt_logprobs, adapter))

    def enqueue(self, request: Request) -> Request:
        """Queues a request made by `make_request`; it holds its adapter's slot until it finishes."""
        if len(request.prompt_ids) >= self.length:
            raise GenerationError(f"the prompt has {len(request.prompt_ids)} tokens; this engine holds {self.length} "
                                  "positions (prompt and new tokens together)")
        if request.adapter is not None:
            try:
                request.adapter_slot = adapter_bank.of(self.model).acquire(request.adapter)
            except ZooError as e:  # unloaded since the request was made
                raise GenerationError(str(e)) from None
        stream = TextStream(self.tokenizer, request.stop) if self.tokenizer is not None else None
        with self._lock:
            self._streams[request.id] = (stream, request.sampler.rng())
            self.waiting.append(request)
        return request

    def prefill_shapes(self) -> list[tuple[int, int]]:
        """Every (batch, width) a prefill call of this engine can have: length buckets x batch buckets."""
        widths = sorted({bucket(n, self.length) for n in range(1, self.length)})
        batches = sorted({bucket(n, self.rows) if n > 1 else 1 for n in range(1, self.rows + 1)})
        return [(b, w) for w in widths for b in batches]

    def decode_rows(self) -> list[int]:
        """Every number of rows a decode call of this engine can have: 1, 2, 4, ... up to `rows`."""
        return sorted({self._rows_for(n) for n in range(1, self.rows + 1)})

    def _rows_for(self, n: int) -> int:
        return min(self.rows, 1 << (n - 1).bit_length())

    def warm_up(self) -> None:
        """Compiles the decode step and every prefill shape now, so no request waits for a compile.

        Must run while the engine is idle (it writes throwaway rows into free slots' caches).
        """
        if not self.idle():
            raise GenerationError("warm_up() needs an idle engine")
        self.steps.refresh()
        prefill, decode = self.steps.prefill, self.steps.decode
        for batch, width in self.prefill_shapes():
            tokens = np.zeros((batch, width), np.int32)
            slots = (np.arange(batch) % self.rows).astype(np.int32)
            _, self.cache = prefill(tokens, np.ones((batch,), np.int32), slots, self.cache,
                                    *self._adapters(np.zeros(batch)))
        for rows in self.decode_rows():
            _, self.cache = decode(np.zeros((rows, 1), np.int32), np.zeros((rows,), np.int32), self.cache,
                                   *self._adapters(np.zeros(rows)))
            if self.rows > 1:  # copies of a prompt's rows (choices of one prompt), as many as decode rows
                self.cache = self.steps.copy_rows(self.cache, np.zeros((rows,), np.int32), np.zeros((rows,), np.int32))

    def cancel(self, request: Request) -> None:
        """Stops a request; its slot is free for the next step."""
        request.cancelled = True

    @property
    def busy(self) -> int:
        return sum(r is not None for r in self.slots)

    def idle(self) -> bool:
        return not self.waiting and not self.busy

    # ------------------------------------------------------------------ stepping

    def step(self) -> list[Event]:
        """Admits waiting requests into free slots, then decodes one token for every busy slot."""
        served = adapter_bank.of(self.model)
        with served.step_lock if served is not None else contextlib.nullcontext():  # no adapter written meanwhile
            if served is not None and served.version != self._bank_version:  # a module got a bank: new weights
                self.steps.refresh()
                self._bank_version = served.version
            events = self._drop_cancelled()
            events += self._admit()
            active = [r for r in self.slots if r is not None and not r.finished]
            if active:
                rows = self._rows_for(max(r.slot for r in active) + 1)  # decode rows [0, rows) of the cache
                tokens = np.zeros((rows, 1), np.int32)
                positions, adapters = np.zeros((rows,), np.int32), np.zeros((rows,), np.int32)
                for r in active:
                    tokens[r.slot, 0], positions[r.slot], adapters[r.slot] = r.tokens[-1], r.position, r.adapter_slot
                logits, self.cache = self.steps.decode(tokens, positions, self.cache, *self._adapters(adapters))
                logits = ops.convert_to_numpy(logits)
                events += [self._accept(r, logits[r.slot]) for r in active]
        for i, r in enumerate(self.slots):
            if r is not None and r.finished:
                self.slots[i] = None
                self._finish(r)
        return events

    def _adapters(self, slots) -> tuple:
        """The steps' last argument, each row's adapter slot, if the model serves adapters; else nothing."""
        return (np.asarray(slots, np.int32),) if adapter_bank.of(self.model) is not None else ()

    def _finish(self, r: Request) -> None:
        """A request leaves the engine: its text stream goes, and its hold on its adapter's slot (once)."""
        if self._streams.pop(r.id, None) is not None and r.adapter_slot:
            adapter_bank.of(self.model).release(r.adapter_slot)

    def _drop_cancelled(self) -> list[Event]:
        events = []
        with self._lock:
            for r in [r for r in self.waiting if r.cancelled]:
                self.waiting.remove(r)
                r.finish_reason = "cancelled"
                self._finish(r)
                events.append(Event(r, None, "", True))
        for i, r in enumerate(self.slots):
            if r is not None and r.cancelled and not r.finished:
                r.finish_reason = "cancelled"
                self.slots[i] = None
                self._finish(r)
                events.append(Event(r, None, "", True))
        return events

    def _admit(self) -> list[Event]:
        events = []
        with self._lock:  # prompts to score only: no slot, no prefill
            scored = [r for r in self.waiting if r.max_new_tokens == 0]
            for r in scored:
                self.waiting.remove(r)
        for r in scored:
            self._score_prompt(r)
            r.finish_reason = "length"
            self._finish(r)
            events.append(Event(r, None, "", True))
        free = [i for i, r in enumerate(self.slots) if r is None]
        admitted = []
        with self._lock:
            while free and self.waiting:
                r = self.waiting.popleft()
                r.slot = free.pop(0)
                self.slots[r.slot] = r
                admitted.append(r)
        by_bucket = collections.defaultdict(list)
        for r in admitted:
            if r.prompt_logprobs is not None:
                self._score_prompt(r)
            by_bucket[bucket(len(r.prompt_ids), self.length)].append(r)
        for width, group in sorted(by_bucket.items()):
            first = {}  # a prompt (with its adapter) -> the row that prefills it; more requests of it copy that row
            for r in group:
                first.setdefault((tuple(r.prompt_ids), r.adapter_slot), r)
            unique = list(dict.fromkeys(first.values()))
            batch = bucket(len(unique), self.rows) if len(unique) > 1 else 1
            padded = unique + [unique[0]] * (batch - len(unique))  # repeats write the same rows again
            tokens = np.zeros((batch, width), np.int32)
            for row, r in enumerate(padded):
                tokens[row, : len(r.prompt_ids)] = r.prompt_ids
            lengths = np.array([len(r.prompt_ids) for r in padded], np.int32)
            slots = np.array([r.slot for r in padded], np.int32)
            adapters = self._adapters([r.adapter_slot for r in padded])
            logits, self.cache = self.steps.prefill(tokens, lengths, slots, self.cache, *adapters)
            logits = ops.convert_to_numpy(logits)
            copies = [(first[tuple(r.prompt_ids), r.adapter_slot], r) for r in group if r not in unique]
            if copies:
                n = self._rows_for(len(copies))
                pairs = copies + [copies[0]] * (n - len(copies))
                sources = np.array([source.slot for source, _ in pairs], np.int32)
                self.cache = self.steps.copy_rows(self.cache, sources, np.array([r.slot for _, r in pairs], np.int32))
            row_of = {id(r): row for row, r in enumerate(unique)}
            events += [self._accept(r, logits[row_of[id(first[tuple(r.prompt_ids), r.adapter_slot])]]) for r in group]
        return events

    def _score_prompt(self, r: Request) -> None:
        """Log-probabilities of the prompt's tokens (after the first) under the model: one forward pass."""
        extra = self._adapters([r.adapter_slot])
        adapters = {"adapters": extra[0]} if extra else {}
        logits = ops.convert_to_numpy(self.model(np.asarray([r.prompt_ids], np.int32), **adapters))[0, :-1]  # (p-1, v)
        scores = samplers.log_probs(logits, r.sampler.temperature)
        r.prompt_scores = [(float(lp[t]), samplers.top_log_probs(lp, r.prompt_logprobs))
                           for lp, t in zip(scores, r.prompt_ids[1:])]

    def _accept(self, r: Request, logits: np.ndarray) -> Event:
        """Samples the request's next token and applies the stop rules."""
        stream, rng = self._streams[r.id]
        token = r.sampler.choose(logits, rng)
        if r.logprobs is not None:
            scores = samplers.log_probs(logits, r.sampler.temperature)
            r.token_scores.append((float(scores[token]), samplers.top_log_probs(scores, r.logprobs)))
        if r.first_token_at is None:
            r.first_token_at = time.perf_counter()
        r.tokens.append(token)
        if token in r.stop_ids:
            r.finish_reason = "stop"
            text = stream.finish() if stream else ""
            r.text = stream.text if stream else ""
            return Event(r, token, text, True)
        text = stream.push(token) if stream else ""
        if stream and stream.stopped:
            r.finish_reason = "stop"
        elif len(r.tokens) >= r.max_new_tokens or len(r.prompt_ids) + len(r.tokens) >= self.length:
            r.finish_reason = "length"
        if stream:
            text += stream.finish() if r.finished else ""
            r.text = stream.text
        return Event(r, token, text, r.finished)

    def run(self, requests: list[Request]):
        """Steps until every request is finished, yielding each step's events."""
        self.steps.refresh()
        while not all(r.finished for r in requests):
            yield from self.step()
