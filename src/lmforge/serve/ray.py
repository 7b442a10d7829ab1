"""Serving beyond one process: N replicas of ``create_app`` as a Ray Serve deployment behind Ray's router.

Each replica is a Ray actor that loads the model itself and runs the same app as ``lmforge serve`` (the same
routes, limits, guard and continuous-batching scheduler); Ray's HTTP proxy picks a replica per request
(least ongoing requests of two, retrying another replica when the picked one has died). Nothing here is a
second server: a replica builds its app with ``create_app`` and adds one response header,
``X-Lmforge-Replica`` (the replica's id), so a client (and ``/health``, ``/metrics``) can tell which replica
answered.

Entry points, from the smallest:

- ``application(spec, replicas=N)``: the bound Ray Serve application, for ``serve.run`` on any cluster;
- ``build({"model": ..., "replicas": "2", ...})``: the same from string arguments, the form Ray's config
  files use (``serve run lmforge.serve.ray:build model=NAME replicas=2``; KubeRay's RayService
  ``import_path: lmforge.serve.ray:build`` with ``args``);
- ``start(spec, replicas=N, host=..., port=..., address=None)``: a local Ray cluster (or the one at
  ``address``), Serve's proxy on host:port and the application, until ``.stop()``;
  ``serve_until_interrupted`` (``lmforge serve --ray``) until Ctrl-C.

Each replica reserves ``spec.threads`` CPUs from Ray and runs that many intra-op threads (default 1: replicas
are processes that would otherwise each take every core, and on a small machine they fight for them), and
``spec.gpus`` GPUs (default 0: Ray hides the GPUs from a replica that reserves none).

A replica loads the model by name, which its node must resolve (a hub id, the bundled model, a shared path);
``start`` joining a cluster ships a local folder, file or store entry instead (``ship_model``): its files go
into Ray's object store and each node's first replica writes them to ``<home>/ray-models/SHA256/``.

Ray is imported only here, and this module only by ``lmforge serve --ray`` and callers that want it: plain
``lmforge serve`` never imports ray (``pip install lmforge[ray]`` adds it).

Connections behind Ray are Ray's proxy's (uvicorn, ``keep_alive_s`` from ``ServerLimits``): the per-connection
read timeout and connection cap of ``serve/limits.py`` apply to ``lmforge serve`` alone. The router queues at
most ``max_queue`` requests beyond the ``max_batch + max_queue`` each replica takes; past that, 503.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
from ray import serve
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmforge import runtime
from lmforge.api import LLM
from lmforge.errors import LmforgeError
from lmforge.home import lmforge_home
from lmforge.loading import resolve
from lmforge.serve.app import _model_id, create_app  # the served name of a shipped model: the one it had
from lmforge.serve.limits import ServerLimits

if TYPE_CHECKING:
    from fastapi import FastAPI
    from ray.serve import Application

MAX_REPLICAS = 64  # replicas of one application: each holds its own copy of the model
MAX_THREADS = 256  # intra-op threads (= CPUs reserved) per replica
MAX_GPUS = 16  # GPUs reserved per replica
# A shipped model file travels in pieces of this size: memory stays bounded at both ends.
SHIP_PIECE_BYTES = 64 << 20
APP_NAME = "lmforge"
DEPLOYMENT_NAME = "LmforgeServer"
REPLICA_HEADER = "X-Lmforge-Replica"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # what ends `lmforge serve --ray`, shutting its cluster down


@dataclass(frozen=True)
class ReplicaSpec:
    """What every replica loads (``LLM.load``'s arguments) and serves (``create_app``'s), and its threads.

    The spec travels to the replicas through Ray (``api_key`` included: Ray's cluster is trusted with it)."""

    model: str | None = None  # a name LLM.load resolves on the replica's node (None: the bundled model)
    dtype: str = "auto"
    device: str = "auto"
    quant: str = "auto"
    compile: bool | None = None  # None: LLM.load's default ($LMFORGE_COMPILE)
    threads: int = 1  # intra-op threads per replica, and the CPUs it reserves from Ray
    gpus: float = 0.0  # GPUs each replica reserves (a fraction shares one); Ray hides the GPUs of 0
    api_key: str | None = None
    max_batch: int = 8
    max_queue: int = 64
    max_context: int | None = None
    cors_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] | None = None
    model_name: str | None = None
    warm_up: bool = True  # compile every batch size's step before the replica takes requests
    batch_weights: str = "auto"  # quant.set_batch_weights


@dataclass(frozen=True)
class ShippedModel:
    """A local model's files in Ray's object store, for replicas on nodes that do not have them."""

    name: str  # the folder's or file's name
    digest: str  # sha256 of the relative paths, sizes and contents: its cache folder on every node
    files: tuple[tuple[str, tuple[ray.ObjectRef, ...]], ...]  # relative path ("" for a lone file) -> pieces


class LmforgeReplica:
    """One replica: loads the model when Ray builds its app (``__serve_build_asgi_app__``) and serves it."""

    def __init__(self, spec: ReplicaSpec, shipped: ShippedModel | None = None) -> None:
        self.spec = spec
        self.shipped = shipped
        self.server: FastAPI | None = None  # not `app`: Ray's ingress wrapper has that name

    def __serve_build_asgi_app__(self) -> FastAPI:
        spec = self.spec
        runtime.set_threads(spec.threads)
        model = spec.model if self.shipped is None else str(receive_model(self.shipped))
        llm = LLM.load(model, dtype=spec.dtype, device=spec.device, quant=spec.quant, compile=spec.compile)
        app = create_app(
            llm,
            api_key=spec.api_key,
            max_batch=spec.max_batch,
            max_queue=spec.max_queue,
            max_context=spec.max_context,
            cors_origins=spec.cors_origins,
            allowed_hosts=spec.allowed_hosts,
            model_name=spec.model_name,
            warm_up=spec.warm_up,
            batch_weights=spec.batch_weights,
        )
        app.add_middleware(ReplicaHeader, replica=serve.get_replica_context().replica_id.unique_id)
        self.server = app
        return app

    def check_health(self) -> None:
        """Ray replaces a replica whose scheduler thread has stopped (its /health answers 503 then)."""
        if self.server is not None and not self.server.state.scheduler.alive:
            raise RuntimeError("the replica's scheduler has stopped")


class ReplicaHeader:
    """ASGI middleware: every HTTP response names the replica that answered it."""

    def __init__(self, app: ASGIApp, replica: str) -> None:
        self.app = app
        self.value = replica.encode("ascii")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def named(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", ()), (REPLICA_HEADER.lower().encode(), self.value)]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, named)


def ship_model(model: str | None) -> ShippedModel | None:
    """Put a model folder, .gguf file or store entry of this machine into Ray's object store, in pieces of
    ``SHIP_PIECE_BYTES``; None for a packaged model or a hub id, which every node has or downloads itself.
    The objects live while this process does (it owns them): replicas Ray restarts later fetch them too."""
    source = resolve(model)
    if source.kind not in ("folder", "gguf", "store") or source.path is None:
        return None
    root = source.path
    if root.is_file():
        entries = [("", root)]
    else:
        entries = sorted((p.relative_to(root).as_posix(), p) for p in root.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    files = []
    for relative, path in entries:
        digest.update(f"{relative}\0".encode())
        pieces, size = [], 0
        with path.open("rb") as f:
            while piece := f.read(SHIP_PIECE_BYTES):
                digest.update(piece)
                size += len(piece)
                pieces.append(ray.put(piece))
        digest.update(f"\0{size}\0".encode())  # after the bytes: the receiver hashes them as they arrive
        files.append((relative, tuple(pieces)))
    return ShippedModel(root.resolve().name, digest.hexdigest(), tuple(files))


def receive_model(shipped: ShippedModel) -> Path:
    """The shipped model on this node: ``<home>/ray-models/DIGEST/NAME``, fetched once per node (written to a
    temporary folder and renamed into place, so replicas sharing a node never read a half-written copy), its
    digest checked."""
    cache = lmforge_home() / "ray-models"
    target = cache / shipped.digest
    if not target.is_dir():
        temporary = cache / f".{shipped.digest}.{os.getpid()}"
        shutil.rmtree(temporary, ignore_errors=True)
        digest = hashlib.sha256()
        try:
            for relative, pieces in shipped.files:
                if ".." in Path(relative).parts or Path(relative).is_absolute():
                    raise LmforgeError(f"shipped model file {relative!r} is outside its folder")
                path = temporary / shipped.name / relative if relative else temporary / shipped.name
                path.parent.mkdir(parents=True, exist_ok=True)
                digest.update(f"{relative}\0".encode())
                size = 0
                with path.open("wb") as f:
                    for ref in pieces:
                        piece = ray.get(ref)
                        digest.update(piece)
                        size += len(piece)
                        f.write(piece)
                    f.flush()
                    os.fsync(f.fileno())
                digest.update(f"\0{size}\0".encode())
            if digest.hexdigest() != shipped.digest:
                raise LmforgeError(
                    f"the shipped model {shipped.name} arrived damaged (sha256 differs)", hint="start again"
                )
            try:
                temporary.rename(target)
            except OSError:  # another replica of this node renamed its copy first
                if not target.is_dir():
                    raise
        finally:
            shutil.rmtree(temporary, ignore_errors=True)
    return target / shipped.name


def check_replicas(replicas: int, threads: int, gpus: float = 0.0) -> None:
    if not 1 <= replicas <= MAX_REPLICAS:
        raise LmforgeError(
            f"replicas={replicas} is outside 1 to {MAX_REPLICAS}",
            hint=f"use 1 to {MAX_REPLICAS} replicas (each loads its own copy of the model)",
        )
    if not 1 <= threads <= MAX_THREADS:
        raise LmforgeError(
            f"{threads} threads per replica is outside 1 to {MAX_THREADS}",
            hint="use e.g. 1, the default (--replica-threads; threads= in Ray's config arguments)",
        )
    if not 0 <= gpus <= MAX_GPUS:
        raise LmforgeError(
            f"{gpus:g} GPUs per replica is outside 0 to {MAX_GPUS}",
            hint="use e.g. 1, or 0.5 for two replicas per GPU (--replica-gpus; gpus= in Ray's config arguments)",
        )


def application(spec: ReplicaSpec, *, replicas: int = 1, shipped: ShippedModel | None = None) -> Application:
    """The Ray Serve application: ``replicas`` copies of ``spec``'s server, ``spec.threads`` CPUs and
    ``spec.gpus`` GPUs each; with ``shipped`` (``ship_model``), they load that instead of ``spec.model``."""
    check_replicas(replicas, spec.threads, spec.gpus)
    deployment = serve.deployment(
        serve.ingress()(LmforgeReplica),
        name=DEPLOYMENT_NAME,
        num_replicas=replicas,
        ray_actor_options={"num_cpus": spec.threads, "num_gpus": spec.gpus},
        # A replica takes what its scheduler would (running + queued sequences); the router holds back the rest,
        # at most max_queue of them, so a full cluster answers 503 instead of queueing without bound.
        max_ongoing_requests=spec.max_batch + spec.max_queue,
        max_queued_requests=spec.max_queue,
        logging_config={"log_level": "WARNING"},  # not a line per request, as `lmforge serve`
    )
    return deployment.bind(spec, shipped)


def build(args: Mapping[str, object]) -> Application:
    """``application`` from the arguments Ray's config files give (strings from ``serve run``'s ``key=value``
    pairs; YAML values from a RayService's ``args``): ``replicas`` and ``ReplicaSpec``'s fields
    (``compile``: true/false; ``cors_origins``, ``allowed_hosts``: comma-separated)."""
    fields = {f.name: f for f in dataclasses.fields(ReplicaSpec)}
    unknown = sorted(set(args) - set(fields) - {"replicas"})
    if unknown:
        raise LmforgeError(
            f"unknown argument(s) {', '.join(unknown)}", hint=f"use replicas or {', '.join(fields)}"
        )
    values: dict[str, Any] = {}
    for name, raw in args.items():
        if name == "replicas":
            continue
        values[name] = _parse(name, str(raw), fields[name].type)
    replicas = _parse("replicas", str(args.get("replicas", "1")), "int")
    return application(ReplicaSpec(**values), replicas=replicas)


def _parse(name: str, raw: str, kind: Any) -> Any:
    kind = str(kind)
    if kind.startswith("float"):
        try:
            return float(raw)
        except ValueError:
            raise LmforgeError(f"{name}={raw!r} is not a number", hint=f"e.g. {name}=0.5") from None
    if kind.startswith("int"):
        try:
            return int(raw)
        except ValueError:
            raise LmforgeError(f"{name}={raw!r} is not a whole number", hint=f"e.g. {name}=2") from None
    if kind.startswith("bool"):
        if raw.lower() not in ("true", "false"):
            raise LmforgeError(f"{name}={raw!r} is not true or false", hint=f"e.g. {name}=false")
        return raw.lower() == "true"
    if kind.startswith("tuple"):
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    return raw


@dataclass(frozen=True)
class RayServer:
    """An application ``start`` deployed: its URL, and what ``stop`` ends."""

    url: str
    local: bool  # this process started the Ray cluster: stopping ends it
    connected: bool  # this process connected to Ray in ``start``: stopping disconnects

    def stop(self) -> None:
        """Remove the application; a cluster ``start`` started ends with it, one it joined keeps running
        (and its other applications)."""
        try:
            if not ray.is_initialized():
                return
            if self.local:
                serve.shutdown()
            else:
                serve.delete(APP_NAME)
        finally:
            if self.connected:
                ray.shutdown()


def start(
    spec: ReplicaSpec,
    *,
    replicas: int = 1,
    host: str = "127.0.0.1",
    port: int = 8000,
    address: str | None = None,
    ship: bool | None = None,
) -> RayServer:
    """Start a local Ray cluster (or join the one at ``address``), Serve's proxy on ``host:port`` and
    ``replicas`` replicas of ``spec``; returns once every replica has loaded its model and answers.

    A local cluster gets at least ``replicas x spec.threads`` CPUs, so the replicas start on a small machine
    (sharing its cores); a cluster at ``address`` must have them, and where Serve already runs there, its proxy
    keeps the host and port it has. ``ship`` (default: when joining a cluster) sends a model folder, file or
    store entry of this machine to the replicas' nodes (``ship_model``); otherwise each node resolves the name
    itself. Anything started is stopped again if the replicas fail."""
    check_replicas(replicas, spec.threads, spec.gpus)
    ship = address is not None if ship is None else ship
    if address is None:
        resolve(spec.model)  # a misspelt name is one line here, not a replica's traceback in Ray's log
    connected = not ray.is_initialized()  # a caller may have connected already: then its cluster is used
    if connected:
        options: dict[str, Any] = dict(
            address=address, include_dashboard=False, logging_level=logging.WARNING
        )
        if address is None:
            options["num_cpus"] = max(os.cpu_count() or 1, replicas * spec.threads)
        try:
            ray.init(**options)
        except ConnectionError as e:
            raise LmforgeError(
                f"cannot reach the Ray cluster at {address}: {e}",
                hint="check --ray-address (e.g. auto, or ray://HEAD:10001), or leave it out for a local cluster",
            ) from None
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    server = RayServer(url, local=connected and address is None, connected=connected)
    try:
        shipped = ship_model(spec.model) if ship else None
        if shipped is not None and spec.model_name is None:  # the name the replicas serve, not the cache's
            spec = dataclasses.replace(spec, model_name=_model_id(str(spec.model)))
        app = application(spec, replicas=replicas, shipped=shipped)
        keep_alive = ServerLimits().keep_alive_s
        serve.start(
            http_options={"host": host, "port": port, "keep_alive_timeout_s": keep_alive},
            logging_config={"log_level": "WARNING"},
        )
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)  # waits until every replica is ready
    except RuntimeError as e:  # Serve's word for a failed deployment; the replicas' errors are in its log
        server.stop()
        raise LmforgeError(
            f"the replicas failed to start: {e}", hint="see the replicas' errors above"
        ) from None
    except BaseException:
        server.stop()
        raise
    return server


def serve_until_interrupted(
    spec: ReplicaSpec,
    *,
    replicas: int,
    host: str,
    port: int,
    address: str | None,
    on_ready: Callable[[str], None],
    ship: bool | None = None,
) -> None:
    """``start``, call ``on_ready(url)``, and serve until the process is interrupted (Ctrl-C, SIGTERM), then
    stop."""
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # the URL line says what its INFO lines say
    main = threading.current_thread() is threading.main_thread()  # only it may set signal handlers
    previous = {number: signal.getsignal(number) for number in STOP_SIGNALS} if main else {}
    try:
        _stop_on_signals(main)
        server = start(spec, replicas=replicas, host=host, port=port, address=address, ship=ship)
        _stop_on_signals(main)  # again: ray.init installs a SIGTERM handler of its own
        try:
            on_ready(server.url)
            while True:  # short sleeps: a signal delivered to one of Ray's threads does not wake a long one
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        finally:
            server.stop()
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _stop_on_signals(main: bool) -> None:
    """Ctrl-C and a service manager's SIGTERM both raise KeyboardInterrupt, so the cluster is shut down; SIGINT
    too where the shell started the process with it ignored (a background job)."""
    if main:
        for number in STOP_SIGNALS:
            signal.signal(number, _interrupt)


def _interrupt(number: int, frame: object) -> None:
    raise KeyboardInterrupt


def replica_actor(replica_id: str, app_name: str = APP_NAME) -> ray.actor.ActorHandle:
    """The Ray actor of the replica named ``replica_id`` (the ``X-Lmforge-Replica`` header's value) in the
    application ``app_name`` (``start``'s; ``serve run`` and config files name theirs)."""
    return ray.get_actor(f"SERVE_REPLICA::{app_name}#{DEPLOYMENT_NAME}#{replica_id}", namespace="serve")
