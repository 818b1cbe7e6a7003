"""Schedulers between HTTP handlers (asyncio) and the models (one worker thread each).

`GenerationScheduler` drives a `zoo.generation.GenerationEngine`: a fixed number of slots share
one compiled decode step; requests join at step boundaries and leave when they finish or their
client goes away. `ClassificationScheduler` gathers concurrent image requests into micro-batches.
Neither holds model code: they call the task objects' public methods.
"""

import asyncio
import threading
import time
from dataclasses import dataclass, field

from zoo.generation import GenerationEngine, bucket


class QueueFull(Exception):
    """The scheduler's queue is at its bound; the client should retry later."""


@dataclass(eq=False)
class Ticket:
    """One HTTP request's generation: the engine request and the asyncio queue its events go to."""

    request: object
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    submitted: float = field(default_factory=time.perf_counter)


class _Worker:
    """A daemon thread running `_loop`, woken through `_wake`, stopped once its work is done."""

    def __init__(self, name: str):
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def _pending(self) -> bool:
        raise NotImplementedError

    def _loop(self) -> None:
        raise NotImplementedError

    def start(self):
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 30.0) -> None:
        """Lets in-flight requests finish (up to `timeout`), then ends the worker thread."""
        deadline = time.monotonic() + timeout
        while self._pending() and time.monotonic() < deadline:
            time.sleep(0.02)
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=5)


class GenerationScheduler(_Worker):
    def __init__(self, lm, max_batch: int, max_queue: int, max_model_len: int, metrics=None, name: str = ""):
        self.lm, self.max_queue, self.metrics, self.name = lm, max_queue, metrics, name
        self.length = bucket(min(lm.config.max_position_embeddings, max_model_len), lm.config.max_position_embeddings)
        self.engine = GenerationEngine(lm, max_batch, self.length)
        self._tickets: dict[int, Ticket] = {}
        super().__init__(f"zoo-generate-{name}")

    @property
    def rows(self) -> int:
        return self.engine.rows

    def _pending(self) -> bool:
        return bool(self._tickets)

    def warm_up(self) -> None:
        """Compiles every prefill shape and the decode step before the server says it is ready
        (runs before any request is admitted: /v1 routes answer 503 until then)."""
        self.engine.warm_up()

    def check_room(self, count: int) -> None:
        """Raises QueueFull unless `count` more requests fit in the queue (one HTTP request's choices, all or none)."""
        if len(self.engine.waiting) + count > self.max_queue:
            raise QueueFull(f"the queue holds {self.max_queue} waiting requests")

    def submit(self, prompt_ids, max_new_tokens, sampler, stop_ids, stop, logprobs=None, prompt_logprobs=None,
               adapter=None) -> Ticket:
        """Queues a request (raises QueueFull at the bound), with the served adapter `adapter` (None: the base);
        events arrive on the ticket's queue."""
        self.check_room(1)
        request = self.engine.submit(prompt_ids, max_new_tokens, sampler, stop_ids, stop, logprobs, prompt_logprobs,
                                     adapter)
        ticket = Ticket(request, asyncio.Queue(), asyncio.get_running_loop())
        self._tickets[request.id] = ticket
        with self._wake:
            self._wake.notify()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Frees the request's slot at the next step (its client went away, or it timed out)."""
        if not ticket.request.finished:
            self.engine.cancel(ticket.request)
            with self._wake:
                self._wake.notify()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while self.engine.idle() and not self._stopping:
                    self._wake.wait(timeout=1.0)
                if self._stopping and self.engine.idle():
                    return
            events = self.engine.step()
            if self.metrics:  # after the step: finished and cancelled requests have left their slots
                self.metrics.step(self.name, self.engine.busy, self.rows, len(self.engine.waiting))
            for event in events:
                ticket = self._tickets.get(event.request.id)
                if ticket is None:
                    continue
                if event.finished:
                    self._tickets.pop(event.request.id, None)
                    if event.request.finish_reason == "cancelled" and self.metrics:
                        self.metrics.cancelled.labels(self.name).inc()
                if not ticket.loop.is_closed():
                    try:
                        ticket.loop.call_soon_threadsafe(ticket.queue.put_nowait, event)
                    except RuntimeError:  # the loop closed between the check and the call
                        pass


@dataclass(eq=False)
class _Job:
    images: list
    top_k: int
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


class ClassificationScheduler(_Worker):
    """Runs concurrent classification requests together, up to `max_batch` images per call."""

    def __init__(self, classifier, max_batch: int, max_queue: int, wait_s: float = 0.005, metrics=None, name=""):
        self.classifier, self.max_batch, self.max_queue, self.wait_s = classifier, max_batch, max_queue, wait_s
        self.metrics, self.name = metrics, name
        self._jobs: list[_Job] = []
        super().__init__(f"zoo-classify-{name}")

    def _pending(self) -> bool:
        return bool(self._jobs)

    def warm_up(self) -> None:
        import numpy as np

        h, w = self.classifier.config.image_size
        self.classifier.predict_labels([np.zeros((h, w, self.classifier.config.num_channels), np.uint8)], top_k=1)

    def submit(self, images: list, top_k: int) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        with self._wake:
            if len(self._jobs) >= self.max_queue:
                raise QueueFull(f"the queue holds {self.max_queue} waiting requests")
            job = _Job(images, top_k, loop.create_future(), loop)
            self._jobs.append(job)
            self._wake.notify()
        return job.future

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._jobs and not self._stopping:
                    self._wake.wait(timeout=1.0)
                if self._stopping and not self._jobs:
                    return
            time.sleep(self.wait_s)  # let concurrent requests arrive
            with self._wake:
                batch, count = [], 0
                while self._jobs and (not batch or count + len(self._jobs[0].images) <= self.max_batch):
                    job = self._jobs.pop(0)
                    batch.append(job)
                    count += len(job.images)
            if self.metrics:
                self.metrics.classify_batch(self.name, count)
            try:
                images = [image for job in batch for image in job.images]
                results = self.classifier.predict_labels(images, top_k=max(job.top_k for job in batch))
            except Exception:  # run each job alone, so each gets its own answer or error
                for job in batch:
                    try:
                        job.loop.call_soon_threadsafe(
                            _set, job.future, self.classifier.predict_labels(job.images, top_k=job.top_k), None)
                    except Exception as e:
                        job.loop.call_soon_threadsafe(_set, job.future, None, e)
                continue
            start = 0
            for job in batch:
                mine = [labels[: job.top_k] for labels in results[start: start + len(job.images)]]
                start += len(job.images)
                job.loop.call_soon_threadsafe(_set, job.future, mine, None)


def _set(future: asyncio.Future, result, error) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
