"""The ASGI app: OpenAI-compatible routes over the schedulers, with limits, auth and metrics.

Routes: `GET /health`, `GET /metrics`, `GET /v1/models`, `POST /v1/completions`,
`POST /v1/chat/completions` (both with `stream: true` as server-sent events ending in
`data: [DONE]`; `serving/completions.py`), `POST /v1/classify` (JSON with base64 images, or a
multipart upload), and with LoRA enabled vLLM's `POST /v1/load_lora_adapter` and
`POST /v1/unload_lora_adapter`. Every error is OpenAI's error JSON: `{"error": {"message", "type",
"param", "code"}}`.

Adapters (`--lora NAME=PATH`; `serving/adapters.py`) are served over their base model's scheduler: a
request whose `model` names an adapter runs in the same continuous batch as the base's and the other
adapters' requests (`zoo.lora.bank`).

Example:
    >>> app = create_app(load_models(["gemma_tiny_pycode"]), ServerConfig())  # doctest: +SKIP
    >>> serve(app, ServerConfig(port=8000))  # doctest: +SKIP
"""

import asyncio
import contextlib
import dataclasses
import functools
import hmac
import json
import logging
import math
import threading
import time
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from zoo import backends, hub
from zoo.errors import ConfigError, ImageError, ZooError
from zoo.models.fields import Fields
from zoo.serving.metrics import CONTENT_TYPE_LATEST, Metrics
from zoo.serving import completions
from zoo.serving.adapters import Lora, ServedAdapters
from zoo.serving.protocol import APIError, base64_images, decode_image, field
from zoo.serving.scheduler import ClassificationScheduler, GenerationScheduler, QueueFull

log = logging.getLogger("zoo.serving")


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 8  # generation slots / images per classification batch
    max_queue: int = 64  # requests waiting beyond the running batch; more answer 429
    api_key: str | None = None
    max_body_bytes: int = 8 * 2**20
    max_model_len: int = 2048  # positions per slot (prompt + generated), capped by the model's own maximum
    max_tokens: int | None = None  # the most `max_tokens` a request may ask for (default: max_model_len)
    request_timeout_s: float = 600.0
    max_images: int = 64
    max_image_pixels: int = 40_000_000  # width x height an uploaded image may declare; decoding more is refused
    enable_lora: bool = False  # serve LoRA adapters over the generation models (implied by adapters given at start)
    max_loras: int = 4  # adapters loaded at once, per base model
    max_lora_rank: int = 16  # the highest adapter rank served

    def __post_init__(self):
        fields = Fields(dataclasses.asdict(self), "server settings")
        fields.integer("port", minimum=0)
        if self.port > 65535:
            raise ConfigError(f"server settings: field 'port' should be at most 65535, got {self.port}")
        for name in ("max_batch", "max_body_bytes", "max_model_len", "max_images", "max_image_pixels", "max_loras",
                     "max_lora_rank"):
            fields.integer(name)
        fields.integer("max_queue", minimum=0)
        fields.integer("max_tokens", None)
        fields.number("request_timeout_s", minimum=0.0)


def load_models(presets: list[str]) -> dict[str, object]:
    """Loads each preset (name, handle or folder) with its default task class, keyed by the name clients use."""
    import zoo

    if not presets:
        presets = [card.name for card in zoo.list_presets() if card.bundled]
    where = backends.describe()
    models = {}
    for preset in presets:
        name = hub.short_name(preset)
        models[name] = zoo.from_preset(preset)
        log.info("loaded %s (%s) on %s, device %s", name, type(models[name]).__name__, where["backend"], where["device"])
    return models


def check_port(host: str, port: int) -> None:
    """Ends start-up with one line if the address is taken, before any model loads (uvicorn would fail only
    after them, and a native library's threads could then abort the process)."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise SystemExit(f"zoo serve: cannot listen on {host}:{port} ({e.strerror or e}); "
                             "is another server running there? Pick another with --port") from None


# ----------------------------------------------------------------------------- the app


class Server:
    def __init__(self, models: dict, config: ServerConfig, loras: list[Lora] = ()):
        self.config, self.models, self.metrics = config, models, Metrics()
        self.generators: dict[str, GenerationScheduler] = {}
        self.classifiers: dict[str, ClassificationScheduler] = {}
        for name, model in models.items():
            if callable(getattr(model, "generate", None)) and getattr(model, "tokenizer", None) is not None:
                self.generators[name] = GenerationScheduler(model, config.max_batch, config.max_queue,
                                                            config.max_model_len, self.metrics, name)
            elif hasattr(model, "predict_labels"):
                self.classifiers[name] = ClassificationScheduler(model, config.max_batch, config.max_queue,
                                                                 metrics=self.metrics, name=name)
            else:
                raise ZooError(f"model {name!r} ({type(model).__name__}) has no task the server can serve")
        self.lora = ServedAdapters(self.generators, config, loras, taken=set(models), read_body=self.json_body)
        self.ready = threading.Event()
        self.created = int(time.time())

    # lifecycle
    def start(self) -> None:
        for s in [*self.generators.values(), *self.classifiers.values()]:
            s.start()
        threading.Thread(target=self._warm_up, name="zoo-warm-up", daemon=True).start()

    def _warm_up(self) -> None:
        started = time.perf_counter()
        for s in [*self.generators.values(), *self.classifiers.values()]:
            s.warm_up()
        log.info("models ready after %.1fs warm-up", time.perf_counter() - started)
        self.ready.set()

    def stop(self) -> None:
        for s in [*self.generators.values(), *self.classifiers.values()]:
            s.stop()

    def alive(self) -> bool:
        """Whether every scheduler's thread is running (a health check's question)."""
        return all(s.alive for s in [*self.generators.values(), *self.classifiers.values()])

    @property
    def adapters(self) -> dict[str, str]:
        """The served adapters and the model each is served over."""
        return self.lora.bases

    # plumbing
    def endpoint(self, route: str, handler, protected: bool = True):
        @functools.wraps(handler)  # the route keeps the handler's docstring (the docs' server reference reads it)
        async def wrapped(request: Request):
            started = time.perf_counter()
            try:
                if protected and self.config.api_key is not None:
                    given = request.headers.get("authorization", "")
                    expected = f"Bearer {self.config.api_key}"
                    if not hmac.compare_digest(given.encode(), expected.encode()):
                        raise APIError(401, "Incorrect API key provided: give 'Authorization: Bearer <key>'",
                                       "authentication_error", code="invalid_api_key")
                if route.startswith("/v1/") and request.method == "POST" and not self.ready.is_set():
                    raise APIError(503, "the server is still loading models; retry shortly", "server_error",
                                   code="not_ready", headers={"Retry-After": "1"})
                response = await handler(request)
            except QueueFull as e:
                response = APIError(429, f"the server is at capacity ({e}); retry later", "rate_limit_error",
                                    code="queue_full", headers={"Retry-After": "1"}).response()
            except APIError as e:
                response = e.response()
            except Exception:  # a bug: still an OpenAI-shaped 500, and logged
                log.exception("error in %s", route)
                response = APIError(500, "internal server error", "server_error").response()
            self.metrics.requests.labels(route, str(response.status_code)).inc()
            if not isinstance(response, StreamingResponse):
                self.metrics.latency.labels(route).observe(time.perf_counter() - started)
            return response

        return wrapped

    def check_declared_size(self, request: Request) -> None:
        limit, declared = self.config.max_body_bytes, request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"the request body is {declared} bytes; the limit is {limit}", code="body_too_large")

    def counted(self, request: Request) -> Request:
        """The request with a body that ends in a 413 once more than `max_body_bytes` have arrived, however it
        is sent (chunked, multipart): the declared length is only a first check."""
        limit, seen, receive = self.config.max_body_bytes, 0, request.receive

        async def counting():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b"")) if message["type"] == "http.request" else 0
            if seen > limit:
                raise APIError(413, f"the request body is over the {limit}-byte limit", code="body_too_large")
            return message

        return Request(request.scope, counting)

    async def json_body(self, request: Request) -> dict:
        self.check_declared_size(request)
        limit, chunks, size = self.config.max_body_bytes, [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise APIError(413, f"the request body is over the {limit}-byte limit", code="body_too_large")
                chunks.append(chunk)
        except ClientDisconnect:
            raise APIError(400, "the client went away while sending the body") from None
        try:
            body = json.loads(b"".join(chunks) or b"null")
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
        except RecursionError:  # nested past the parser's depth: no request of this API is
            raise APIError(400, "the request body is nested too deeply", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_json")
        return body

    def model(self, body: dict, kind: str):
        """The request's model: (name, scheduler), and for generation the adapter it names (None: a base model)."""
        name = field(body, "model", str, required=True, message="a model id (see GET /v1/models)")
        table = self.generators if kind == "generate" else self.classifiers
        if kind == "generate" and name in self.adapters:
            return name, table[self.adapters[name]], name
        if name not in table:
            other = "text generation" if kind == "generate" else "image classification"
            known = sorted(table) + (sorted(self.adapters) if kind == "generate" else []) or ["none"]
            raise APIError(404, f"The model '{name}' does not exist or does not do {other}; "
                                f"models that do: {', '.join(known)}", param="model", code="model_not_found")
        return (name, table[name], None) if kind == "generate" else (name, table[name])

    # routes
    async def health(self, request: Request):
        """200 {"status": "ok", "models": [...]} once every model is loaded and warmed up; 503 before. No API key."""
        if not self.ready.is_set():
            return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "1"})
        return JSONResponse({"status": "ok", "models": sorted(self.served())})

    async def metrics_route(self, request: Request):
        """Prometheus metrics: requests by route and status, latency, tokens, time to first token, batch use."""
        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def model_card(self, name: str) -> dict:
        """vLLM's model card: an adapter has its base as `parent` and where it was loaded from as `root`."""
        base = self.adapters.get(name)
        model, root = (base, self.lora.source(name)) if base is not None else (name, name)
        return {"id": name, "object": "model", "created": self.created, "owned_by": "keras-zoo", "root": root,
                "parent": base, "task": type(self.models[model]).__name__,
                "max_model_len": self.generators[model].length if model in self.generators else None}

    def served(self) -> list[str]:
        return list(self.models) + list(self.adapters)

    async def list_models(self, request: Request):
        """The served models and adapters (OpenAI's list; vLLM's `root` and `parent`)."""
        return JSONResponse({"object": "list", "data": [self.model_card(name) for name in self.served()]})

    async def retrieve_model(self, request: Request):
        """One model's card, or a 404 listing the served ones."""
        name = request.path_params["model"]
        if name not in self.models and name not in self.adapters:
            raise APIError(404, f"The model '{name}' does not exist; models: {', '.join(sorted(self.served()))}",
                           param="model", code="model_not_found")
        return JSONResponse(self.model_card(name))

    async def completions(self, request: Request):
        """Text completions: `prompt` (a string, token ids, or a list of either), `logprobs`, `echo`, `n`, `stream`."""
        return await completions.generate(self, request, chat=False)

    async def chat_completions(self, request: Request):
        """Chat completions through the model's chat template: `messages`, `logprobs`/`top_logprobs`, `n`, `stream`."""
        return await completions.generate(self, request, chat=True)

    async def events(self, request: Request, name: str, scheduler: GenerationScheduler, ticket, streaming=False):
        """The ticket's events; cancels the request if the client disconnects or the deadline passes.

        A streaming response learns of a disconnect when its next chunk cannot be sent (one decode step);
        a plain one asks after every event, so neither runs on for a client that has gone.
        """
        deadline = ticket.submitted + self.config.request_timeout_s
        first = True
        try:
            while True:
                try:
                    event = await asyncio.wait_for(ticket.queue.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    if time.perf_counter() > deadline:
                        raise
                    if await request.is_disconnected():
                        scheduler.cancel(ticket)
                    continue
                if not event.finished and time.perf_counter() > deadline:
                    raise asyncio.TimeoutError
                if event.token_id is not None:
                    self.metrics.tokens.labels(name).inc()
                    if first:
                        self.metrics.ttft.labels(name).observe(time.perf_counter() - ticket.submitted)
                        first = False
                yield event
                if event.finished:
                    return
                if not streaming and await request.is_disconnected():
                    scheduler.cancel(ticket)
        finally:
            if not ticket.request.finished:
                scheduler.cancel(ticket)

    async def classify(self, request: Request):
        """Image classification: JSON `{"model", "images": [base64], "top_k"}` or a multipart upload (`image`)."""
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            self.check_declared_size(request)
            try:
                form = await self.counted(request).form(max_files=self.config.max_images,
                                                        max_part_size=self.config.max_body_bytes)
            except APIError:
                raise
            except Exception as e:  # Starlette's MultiPartException and the parser's errors
                raise APIError(400, f"cannot read the multipart form: {e}") from None
            body = {"model": form.get("model"), "top_k": int(form["top_k"]) if str(form.get("top_k", "")).isdigit()
                    else form.get("top_k")}
            blobs = [await f.read() for key in ("image", "images") for f in form.getlist(key) if hasattr(f, "read")]
            if not blobs:
                raise APIError(400, "upload at least one file in the 'image' field", param="image")
        else:
            body = await self.json_body(request)
            blobs = base64_images(body)
        name, scheduler = self.model(body, "classify")
        top_k = field(body, "top_k", int, 5, check=lambda v: v > 0, message="a positive integer")
        if len(blobs) > self.config.max_images:
            raise APIError(400, f"{len(blobs)} images; at most {self.config.max_images} per request", param="images")
        limit = self.config.max_image_pixels
        images = await asyncio.to_thread(lambda: [decode_image(blob, i, limit) for i, blob in enumerate(blobs)])
        try:
            results = await scheduler.submit(images, top_k)
        except (ImageError, ZooError) as e:
            raise APIError(400, str(e), param="images") from None
        for labels in results:  # a model loaded with allow_nonfinite may score NaN: JSON has no NaN, so null
            for entry in labels:
                entry["score"] = entry["score"] if math.isfinite(entry["score"]) else None
        return JSONResponse({"object": "list", "model": name,
                             "data": [{"index": i, "labels": labels} for i, labels in enumerate(results)]})


def create_app(models: dict, config: ServerConfig | None = None, loras: list[Lora] = ()) -> Starlette:
    """The Starlette app serving `models` ({name: task object}) and the adapters `loras` over them; its
    schedulers start with the app."""
    config = config or ServerConfig()
    server = Server(models, config, list(loras))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, server.stop)

    e = server.endpoint
    routes = [
        Route("/health", e("/health", server.health, protected=False), methods=["GET"]),
        Route("/metrics", e("/metrics", server.metrics_route), methods=["GET"]),
        Route("/v1/models", e("/v1/models", server.list_models), methods=["GET"]),
        Route("/v1/models/{model:path}", e("/v1/models/{model}", server.retrieve_model), methods=["GET"]),
        Route("/v1/completions", e("/v1/completions", server.completions), methods=["POST"]),
        Route("/v1/chat/completions", e("/v1/chat/completions", server.chat_completions), methods=["POST"]),
        Route("/v1/classify", e("/v1/classify", server.classify), methods=["POST"]),
        Route("/v1/load_lora_adapter", e("/v1/load_lora_adapter", server.lora.load_route), methods=["POST"]),
        Route("/v1/unload_lora_adapter", e("/v1/unload_lora_adapter", server.lora.unload_route), methods=["POST"]),
    ]

    async def not_found(request, exc):
        status = getattr(exc, "status_code", 404)
        message = "Method not allowed" if status == 405 else f"no route {request.url.path}"
        return APIError(status, message, code="not_found" if status == 404 else None).response()

    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: not_found, 405: not_found})
    app.state.server = server
    return app


def serve(app: Starlette, config: ServerConfig) -> None:
    """Runs the app under uvicorn until interrupted; in-flight requests finish before it exits."""
    import uvicorn

    uvicorn.run(app, host=config.host, port=config.port, log_level="info", timeout_graceful_shutdown=30)
