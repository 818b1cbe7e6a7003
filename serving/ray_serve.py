"""`zoo serve --ray`: the same app on Ray Serve, for more traffic than one machine takes.

Two deployments make the application:

- `ZooReplica` (N replicas, or autoscaled): each loads the presets and runs the app of `serving/app.py` with its
  own continuous-batching engines. It serves the HTTP requests the router hands it by calling the app in-process,
  and loads the `--lora` adapters as requests ask for them: Ray Serve's model multiplexing, whose router sends an
  adapter's requests to a replica that already holds it (at most `max_loras` per replica, least recently used
  first out).
- `Router` (the one endpoint): reads each request, names the adapter it asks for (the `model` field) as the
  multiplexed model id, and relays the replica's response, streaming as it comes. A request whose replica stops
  before the first byte of its answer is sent again to another (a few times, then OpenAI's 503 error); one that had
  started streaming ends with the connection.

`zoo serve --ray` deploys it on a local Ray instance or the cluster at `--address`; `serve run
zoo.serving.ray_serve:build presets=gemma_tiny_pycode replicas=2` and a KubeRay RayService (the docs' serving
guide) take the same application. Needs the `serve-ray` extra.

Example:
    >>> app = application(["gemma_tiny_pycode"], ServerConfig(), RayOptions(replicas=2))  # doctest: +SKIP
    >>> run(app, ServerConfig(port=8000), RayOptions())  # doctest: +SKIP
"""

import asyncio
import dataclasses
import json
import logging
import os
import signal
import socket
import threading
from dataclasses import dataclass
from urllib.parse import urlsplit

import ray
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from zoo import backends
from zoo.errors import ConfigError, DistributionError, ZooError
from zoo.serving.adapters import Lora
from zoo.serving.app import ServerConfig, create_app, load_models
from zoo.serving.protocol import APIError

log = logging.getLogger("zoo.serving")

APP = "zoo"
ATTEMPTS = 5  # tries of a request whose replica stopped before answering (0.25, 0.5, 1, 2 s apart)
REPLICA_GONE = (RayActorError, ActorUnavailableError, DeploymentUnavailableError, BackPressureError)
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]


@dataclass
class RayOptions:
    replicas: int = 1
    autoscale: tuple[int, int] | None = None  # (min, max) replicas, scaled on the requests each is running
    address: str | None = None  # ray://HOST:PORT or HOST:PORT (a cluster's GCS); None: a local instance
    replica_cpus: float = 1.0  # the CPUs Ray reserves for each replica
    replica_gpus: float = 0.0

    def __post_init__(self):
        if self.replicas < 1:
            raise ConfigError(f"--replicas should be at least 1, got {self.replicas}")
        low, high = self.autoscale or (0, 1)
        if not 0 <= low <= high or high < 1:
            raise ConfigError(f"--autoscale should be MIN:MAX with 0 <= MIN <= MAX and MAX >= 1, got {self.autoscale}")


def parse_autoscale(text: str) -> tuple[int, int]:
    low, sep, high = text.partition(":")
    if not (sep and low.strip().isdigit() and high.strip().isdigit()):
        raise ConfigError(f"--autoscale {text!r}: expected MIN:MAX replicas, e.g. 1:4")
    return int(low), int(high)


# ----------------------------------------------------------------------------- the replicas


def in_process(app, request: dict, body: bytes):
    """The ASGI messages `app` sends in answer to one HTTP request, as they are sent; the app sees a
    disconnect when the caller stops reading."""
    messages, gone = asyncio.Queue(), asyncio.Event()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "scheme": "http", "root_path": "",
             "raw_path": request["path"].encode(), "client": None, "server": None, **request,
             "query_string": request["query_string"].encode(),
             "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in request["headers"]]}
    delivered = False

    async def receive():
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def run():
        try:
            await app(scope, receive, messages.put)
        finally:
            await messages.put(None)

    async def relay():
        task = asyncio.create_task(run())
        try:
            while (message := await messages.get()) is not None:
                while message.get("more_body") and not messages.empty():  # what is ready goes as one item:
                    after = messages.get_nowait()  # each costs Ray a round trip, a decode step far less
                    if after is None:  # the end, back for the loop to see
                        messages.put_nowait(None)
                        break
                    message = {**after, "body": message["body"] + after.get("body", b"")}
                yield message
            await task  # the app's own exception, if it raised one
        finally:
            gone.set()
            if not task.done():
                await asyncio.wait([task], timeout=5)
                task.cancel()

    return relay()


class Held:
    """An adapter a replica holds for Ray Serve's multiplexing; Ray calls `__del__` when it evicts it."""

    def __init__(self, adapters, name: str):
        self.adapters, self.name = adapters, name

    def __del__(self):
        if self.name in self.adapters.bases:
            self.adapters.unload(self.name)


def replica_class(max_loras: int):
    """The replica deployment's class; made per `max_loras`, which Ray's multiplexing takes at definition."""

    class ZooReplica:
        def __init__(self, presets: list[str], config: ServerConfig, loras: list[Lora]):
            self.app = create_app(load_models(presets), config)
            self.server, self.loras = self.app.state.server, {lora.name: lora for lora in loras}
            self.id = serve.get_replica_context().replica_id.unique_id
            self.loading = asyncio.Lock()
            self.server.start()
            self.server.ready.wait()  # Ray routes to a replica once its constructor returns: warm by then
            log.info("replica %s ready: %s", self.id, ", ".join(self.server.served()))

        @serve.multiplexed(max_num_models_per_replica=max_loras)
        async def adapter(self, name: str) -> Held:
            async with self.loading:
                if name not in self.server.adapters:
                    await asyncio.to_thread(self.server.lora.load, self.loras[name])
            return Held(self.server.lora, name)

        async def http(self, request: dict, body: bytes):
            """Answers one HTTP request: yields its ASGI messages, the first with this replica's id."""
            app, name = self.app, serve.get_multiplexed_model_id()
            if name in self.loras:
                try:
                    await self.adapter(name)
                except ZooError as e:  # a source that does not hold a good adapter: the client hears why
                    app = APIError(400, f"adapter {name!r} cannot be loaded: {e}", param="model",
                                   code="adapter_not_loaded").response()
            async for message in in_process(app, request, body):
                if message["type"] == "http.response.start":
                    message = {**message, "headers": [*message.get("headers", []), (b"x-zoo-replica", self.id.encode())]}
                yield message

        def check_health(self):
            if not self.server.alive():
                raise RuntimeError("a scheduler thread of this replica has stopped")

        def __del__(self):
            self.server.stop()

    return ZooReplica


# ----------------------------------------------------------------------------- the one endpoint


@serve.ingress()
class Router:
    def __init__(self, replica, config: ServerConfig, loras: list[Lora]):
        self.replica, self.config, self.loras = replica, config, {lora.name: lora for lora in loras}

    def __serve_build_asgi_app__(self):
        async def refused(request):
            return APIError(400, "under Ray Serve, adapters are given at start (--lora NAME=PATH) and each replica "
                                 "loads them as requests ask for them", code="not_supported").response()

        return Starlette(routes=[Route("/v1/load_lora_adapter", refused, methods=["POST"]),
                                 Route("/v1/unload_lora_adapter", refused, methods=["POST"]),
                                 Route("/{path:path}", self.forward, methods=METHODS)])

    async def forward(self, request: Request):
        try:
            body = await self.body(request)
        except APIError as e:
            return e.response()
        model = self.model_asked(request, body)
        handle = self.replica.options(stream=True, multiplexed_model_id=model if model in self.loras else "")
        asked = {"method": request.method, "path": request.url.path, "query_string": request.url.query,
                 "headers": [(k, v) for k, v in request.headers.items() if k != "host"]}
        for attempt in range(ATTEMPTS):
            stream = handle.http.remote(asked, body)
            try:
                start = await stream.__anext__()
                first = await stream.__anext__() if start.get("type") == "http.response.start" else start
            except REPLICA_GONE as e:
                log.warning("a replica stopped before answering %s (%s); %s", request.url.path, type(e).__name__,
                            "sending it to another" if attempt + 1 < ATTEMPTS else "giving up")
                if attempt + 1 < ATTEMPTS:  # no wait after the last try: the client hears at once
                    await asyncio.sleep(0.25 * 2 ** attempt)
                continue
            except Exception:  # a bug in a replica: still OpenAI's error JSON, and logged
                log.exception("error in a replica answering %s", request.url.path)
                return APIError(500, "internal server error", "server_error").response()
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in start.get("headers", [])}
            if request.url.path == "/v1/models" and start["status"] == 200:
                return await self.with_adapters(start, first, stream, headers)
            return StreamingResponse(self.rest(first, stream), status_code=start["status"], headers=headers)
        return APIError(503, "no replica could take the request; retry shortly", "server_error",
                        code="replica_unavailable", headers={"Retry-After": "1"}).response()

    async def body(self, request: Request) -> bytes:
        limit, parts, seen = self.config.max_body_bytes, [], 0
        async for part in request.stream():
            seen += len(part)
            if seen > limit:
                raise APIError(413, f"the request body is over the {limit}-byte limit", code="body_too_large")
            parts.append(part)
        return b"".join(parts)

    def model_asked(self, request: Request, body: bytes) -> str | None:
        if not request.headers.get("content-type", "").startswith("application/json"):
            return None
        try:
            asked = json.loads(body)
        except ValueError:
            return None  # the replica answers the error
        return asked.get("model") if isinstance(asked, dict) and isinstance(asked.get("model"), str) else None

    @staticmethod
    async def rest(first: dict, stream):
        """The response's body as the replica sends it; the replica's work is cancelled if the client goes."""
        try:
            message = first
            while True:
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body"):
                    return
                message = await stream.__anext__()
        finally:
            stream.cancel()

    async def with_adapters(self, start: dict, first: dict, stream, headers: dict):
        """The replica's model list, with the adapters it does not hold (yet) added."""
        body = b"".join([part async for part in self.rest(first, stream)])
        listing = json.loads(body)
        listed = {card["id"] for card in listing["data"]}
        for name, lora in self.loras.items():
            if name not in listed:
                listing["data"].append({"id": name, "object": "model", "owned_by": "keras-zoo", "root": lora.source,
                                        "parent": lora.base})
        headers.pop("content-length", None)
        return JSONResponse(listing, status_code=start["status"], headers=headers)


# ----------------------------------------------------------------------------- deploying it


def application(presets: list[str], config: ServerConfig, options: RayOptions, loras: list[Lora] = ()):
    """The Ray Serve application: the replicas and the router in front of them."""
    scaling = ({"autoscaling_config": {"min_replicas": options.autoscale[0], "max_replicas": options.autoscale[1],
                                       "target_ongoing_requests": config.max_batch}}
               if options.autoscale else {"num_replicas": options.replicas})
    env = {"KERAS_BACKEND": backends.describe()["backend"]}  # the replicas run the backend this process chose
    replicas = serve.deployment(replica_class(config.max_loras), name="ZooReplica", max_ongoing_requests=
                                config.max_batch + config.max_queue, health_check_period_s=2, **scaling,
                                ray_actor_options={"num_cpus": options.replica_cpus, "num_gpus": options.replica_gpus,
                                                   "runtime_env": {"env_vars": env}})
    router = serve.deployment(Router, name="Router", ray_actor_options={"num_cpus": 0},
                              max_ongoing_requests=10_000)
    loras = list(loras)
    return router.bind(replicas.bind(list(presets), config, loras), config, loras)


def build(args: dict):
    """The application for `serve run zoo.serving.ray_serve:build key=value ...` and a RayService's `args`:
    `presets` (comma-separated or a list; default the bundled ones), `replicas`, `autoscale` (MIN:MAX), `lora`
    (NAME=PATH, comma-separated or a list), `replica_cpus`, `replica_gpus`, and any `ServerConfig` field."""
    args = dict(args)

    def listed(value):
        return [part for part in value.split(",") if part] if isinstance(value, str) else list(value or [])

    presets, loras = listed(args.pop("presets", [])), [Lora.parse(lora) for lora in listed(args.pop("lora", []))]
    options = RayOptions(replicas=int(args.pop("replicas", 1)), replica_cpus=float(args.pop("replica_cpus", 1.0)),
                         replica_gpus=float(args.pop("replica_gpus", 0.0)),
                         autoscale=parse_autoscale(str(args.pop("autoscale"))) if "autoscale" in args else None)
    kinds = {f.name: f.type for f in dataclasses.fields(ServerConfig)}
    unknown = sorted(set(args) - set(kinds))
    if unknown:
        raise ConfigError(f"zoo.serving.ray_serve:build: unknown argument(s) {', '.join(unknown)}; expected presets, "
                          f"replicas, autoscale, lora, replica_cpus, replica_gpus or {', '.join(kinds)}")
    settings = {name: _typed(name, value, kinds[name]) for name, value in args.items()}
    config = ServerConfig(**{**settings, "enable_lora": settings.get("enable_lora", False) or bool(loras)})
    return application(presets, config, options, loras)


def _typed(name: str, value, kind):
    """A `serve run` argument (always text) as the `ServerConfig` field's type."""
    if not isinstance(value, str) or kind in (str, str | None):
        return value
    try:
        if kind is bool:
            return {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[value.lower()]
        return float(value) if kind is float else int(value)
    except (KeyError, ValueError):
        raise ConfigError(f"zoo.serving.ray_serve:build: argument {name}={value!r} is not a {kind}") from None


def connect(address: str | None) -> None:
    """Joins the Ray cluster at `address`, or starts a local instance; a cluster that cannot be reached is a
    `DistributionError` within seconds, not a long wait."""
    if address is not None:
        where = urlsplit(address if "://" in address else f"tcp://{address}")
        try:
            if where.scheme not in ("ray", "tcp") or not where.hostname or where.port is None:
                raise ValueError
        except ValueError:
            raise DistributionError(f"--address {address!r}: expected ray://HOST:PORT (Ray Client) or HOST:PORT (the "
                               "cluster's GCS)") from None
        try:
            socket.create_connection((where.hostname, where.port), timeout=5).close()
        except OSError as e:
            raise DistributionError(f"cannot reach the Ray cluster at {address} ({e.strerror or e}); is it running, and "
                               "is the port open from here?") from None
    ray.init(address=address, logging_level=logging.WARNING)


def run(app, config: ServerConfig, options: RayOptions, ready=lambda: None) -> None:
    """Deploys `app` behind Ray Serve's HTTP proxy on `config.host:config.port` (on a local Ray instance, or the
    cluster at `options.address`), calls `ready()` once every replica is ready, and serves until SIGINT or SIGTERM;
    then takes the application down, and the local Ray instance if it started one."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    connect(options.address)
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
        serve.run(app, name=APP, route_prefix="/")
        log.info("deployed on Ray Serve from pid %d: http://%s:%d/v1", os.getpid(), config.host, config.port)
        ready()
        stop.wait()
    finally:
        if options.address is None:
            serve.shutdown()
        else:
            serve.delete(APP)
        ray.shutdown()
