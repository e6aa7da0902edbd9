"""The model router: one backend per model, each with its replicas, slots and queue.

Takes the config's model routes; gives `Runtime`, which finds a model by name or alias and
runs a request on one of its replicas. Each backend admits `concurrency` requests per
replica and lets `queue` more wait up to `queue_timeout`; past that the answer is 429 with
`Retry-After`. A replica that fails before taking a request is marked down and the next
one is tried; a health loop brings it back. No replica left is 503, every one failing 502.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp

from sovereign_gateway.contract import ModelRoute
from sovereign_gateway.errors import ApiError
from sovereign_gateway.metrics import Metrics
from sovereign_gateway.runtime.base import (
    Completion,
    EventStream,
    InferenceRequest,
    Replica,
    ReplicaDown,
)
from sovereign_gateway.runtime.embedded import EmbeddedWorker, default_threads
from sovereign_gateway.runtime.upstream import UpstreamReplica

log = logging.getLogger("sovereign_gateway.runtime")

HEALTH_INTERVAL_S = 5.0
RETRY_AFTER_MAX_S = 60
# Weight of the newest request in the moving average of service time behind Retry-After.
SERVICE_TIME_WEIGHT = 0.2


class ModelBackend:
    def __init__(self, route: ModelRoute, replicas: list[Replica], metrics: Metrics) -> None:
        self.route = route
        self.replicas = replicas
        self.metrics = metrics
        self.in_flight: dict[str, int] = {replica.label: 0 for replica in replicas}
        self.waiting = 0
        self.service_seconds = 1.0
        self._changed = asyncio.Condition()

    # -- admission ----------------------------------------------------------------

    def wake(self) -> None:
        """A replica changed state or a slot freed: let waiting requests look again."""

        async def notify() -> None:
            async with self._changed:
                self._changed.notify_all()

        with contextlib.suppress(RuntimeError):  # no running loop: nobody can be waiting
            asyncio.get_running_loop().create_task(notify())

    def _retry_after(self) -> int:
        slots = max(1, self.route.concurrency * len(self.replicas))
        estimate = self.service_seconds * (self.waiting + 1) / slots
        return max(1, min(RETRY_AFTER_MAX_S, math.ceil(estimate)))

    def _overloaded(self, why: str, code: str) -> ApiError:
        self.metrics.rejected.labels(self.route.name, code).inc()
        retry = self._retry_after()
        return ApiError(
            429,
            f"model {self.route.name!r} is busy ({why}); retry after {retry} s",
            code,
            headers={"Retry-After": str(retry)},
        )

    def _unavailable(self, tried: list[str]) -> ApiError:
        states = [f"{r.label}: {r.state()[0]} ({r.state()[1]})" for r in self.replicas]
        if tried:
            return ApiError(
                502,
                f"every replica of model {self.route.name!r} failed: {'; '.join(tried)}",
                "upstream_unreachable",
            )
        if all(r.state()[0] == "refused" for r in self.replicas):
            return ApiError(
                503,
                f"model {self.route.name!r} is refused: {'; '.join(states)}",
                "model_unavailable",
            )
        return ApiError(
            503,
            f"no replica of model {self.route.name!r} is available: {'; '.join(states)}",
            "backend_unavailable",
        )

    async def acquire(self, exclude: set[str], tried: list[str]) -> Replica:
        deadline = time.monotonic() + self.route.queue_timeout_seconds
        async with self._changed:
            while True:
                usable = [
                    r for r in self.replicas
                    if r.label not in exclude and r.state()[0] in ("ready", "starting")
                ]  # fmt: skip
                if not usable:
                    raise self._unavailable(tried)
                free = [
                    r for r in usable
                    if r.state()[0] == "ready" and self.in_flight[r.label] < self.route.concurrency
                ]  # fmt: skip
                if free:
                    chosen = min(free, key=lambda r: self.in_flight[r.label])
                    self.in_flight[chosen.label] += 1
                    self.metrics.in_flight.labels(self.route.name).inc()
                    return chosen
                if self.waiting >= self.route.queue:
                    raise self._overloaded(
                        f"{sum(self.in_flight.values())} in flight, {self.waiting} waiting",
                        "queue_full",
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._overloaded(
                        f"no slot freed in {self.route.queue_timeout_seconds:g} s", "queue_timeout"
                    )
                self.waiting += 1
                self.metrics.queued.labels(self.route.name).inc()
                try:
                    # asyncio.timeout, not wait_for: on 3.11 wait_for drops a cancellation
                    # that lands as the wait completes, and a gone client would take a slot.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(remaining):
                            await self._changed.wait()
                finally:
                    self.waiting -= 1
                    self.metrics.queued.labels(self.route.name).dec()

    def release(self, replica: Replica, started: float | None) -> None:
        self.in_flight[replica.label] -= 1
        self.metrics.in_flight.labels(self.route.name).dec()
        if started is not None:
            elapsed = time.monotonic() - started
            self.service_seconds += SERVICE_TIME_WEIGHT * (elapsed - self.service_seconds)
        self.wake()

    # -- requests -----------------------------------------------------------------

    async def complete(self, request: InferenceRequest) -> tuple[Completion, str]:
        exclude: set[str] = set()
        tried: list[str] = []
        while True:
            replica = await self.acquire(exclude, tried)
            started: float | None = time.monotonic()
            try:
                return await replica.complete(request), replica.label
            except ReplicaDown as down:
                started = None
                exclude.add(replica.label)
                tried.append(str(down))
                self.metrics.failovers.labels(self.route.name).inc()
                log.warning("model %s: %s; trying another replica", self.route.name, down)
            finally:
                self.release(replica, started)

    async def stream(self, request: InferenceRequest) -> tuple[EventStream, str]:
        exclude: set[str] = set()
        tried: list[str] = []
        while True:
            replica = await self.acquire(exclude, tried)
            started = time.monotonic()
            try:
                stream = await replica.stream(request)
            except ReplicaDown as down:
                self.release(replica, None)
                exclude.add(replica.label)
                tried.append(str(down))
                self.metrics.failovers.labels(self.route.name).inc()
                log.warning("model %s: %s; trying another replica", self.route.name, down)
                continue
            except BaseException:
                self.release(replica, None)
                raise
            return _Leased(stream, functools.partial(self.release, replica, started)), replica.label

    def health(self) -> dict[str, Any]:
        replicas = [replica.describe() for replica in self.replicas]
        return {
            "ready": any(r["state"] == "ready" for r in replicas),
            "engine": "embedded" if self.embedded else self.route.engine,
            "in_flight": sum(self.in_flight.values()),
            "waiting": self.waiting,
            "replicas": replicas,
        }

    @property
    def embedded(self) -> bool:
        return any(isinstance(replica, EmbeddedWorker) for replica in self.replicas)


class _Leased(EventStream):
    """A stream that gives its slot back when it ends, however it ends."""

    def __init__(self, inner: EventStream, release: Callable[[], None]) -> None:
        self._inner = inner
        self._release: Callable[[], None] | None = release

    async def events(self) -> AsyncIterator[bytes]:
        async for event in self._inner.events():
            yield event
        self.usage = self._inner.usage
        self.failed = self._inner.failed

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            self.usage = self.usage or self._inner.usage
            self.failed = self.failed or self._inner.failed
            if self._release is not None:
                self._release()
                self._release = None


class Runtime:
    """Every model's backend, and the health loop over their replicas."""

    def __init__(
        self,
        routes: list[ModelRoute],
        session: Callable[[], aiohttp.ClientSession],
        metrics: Metrics,
    ) -> None:
        self.metrics = metrics
        self.backends: dict[str, ModelBackend] = {}
        self._by_name: dict[str, ModelBackend] = {}
        self._health: asyncio.Task[None] | None = None
        for route in routes:
            backend = ModelBackend(route, [], metrics)
            backend.replicas = self._replicas(route, backend, session)
            backend.in_flight = {replica.label: 0 for replica in backend.replicas}
            self.backends[route.name] = backend
            for name in (route.name, *route.aliases):
                self._by_name[name] = backend

    def _replicas(
        self,
        route: ModelRoute,
        backend: ModelBackend,
        session: Callable[[], aiohttp.ClientSession],
    ) -> list[Replica]:
        if route.replicas:
            return [UpstreamReplica(url, session) for url in route.replicas]
        threads = route.threads or default_threads(route.workers)
        restarts = self.metrics.worker_restarts.labels(route.name)
        return [
            EmbeddedWorker(route, index, threads, backend.wake, restarts.inc)
            for index in range(route.workers)
        ]

    def backend(self, name: str) -> ModelBackend | None:
        return self._by_name.get(name)

    async def start(self) -> None:
        for backend in self.backends.values():
            for replica in backend.replicas:
                await replica.start()
        self._health = asyncio.create_task(self._health_loop(), name="replica-health")

    async def stop(self) -> None:
        if self._health is not None:
            self._health.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health
        for backend in self.backends.values():
            for replica in backend.replicas:
                await replica.stop()

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(HEALTH_INTERVAL_S)
            await self.probe()

    async def probe(self) -> None:
        for backend in self.backends.values():
            before = [replica.state()[0] for replica in backend.replicas]
            await asyncio.gather(
                *(r.probe(busy=backend.in_flight[r.label] > 0) for r in backend.replicas)
            )
            if before != [replica.state()[0] for replica in backend.replicas]:
                backend.wake()
