"""The gateway's running parts, started and stopped together, each failing closed.

Takes the config and its path; gives identity, policy, audit, lock, runtime, memory and
TLS to the guard and the endpoints; a part that cannot start says why in /health.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

import aiohttp
import httpx

from sovereign_gateway import issuer, tls
from sovereign_gateway.audit import AuditLog
from sovereign_gateway.authentication import OIDCBackend
from sovereign_gateway.contract import (
    GatewayConfig,
    KeyFileError,
    load_or_create_private_key,
    resolve,
)
from sovereign_gateway.errors import ApiError
from sovereign_gateway.lock import LockStatus, LockWatcher, facts_for
from sovereign_gateway.memory.errors import MemoryFailure
from sovereign_gateway.memory.service import Memory, open_memory
from sovereign_gateway.metrics import Metrics
from sovereign_gateway.policy import PolicyEngine, PolicyUnavailable, create_engine
from sovereign_gateway.runtime.router import Runtime

log = logging.getLogger("sovereign_gateway")

UPSTREAM_CONNECT_TIMEOUT_S = 5.0


class Components:
    def __init__(self, config: GatewayConfig, config_path: Path) -> None:
        self.config = config
        self.config_path = config_path
        self.metrics = Metrics()
        # aiohttp for the hop to the engines: it costs about 0.1 ms of CPU per request here,
        # httpx about 1.8 ms (docs/benchmarks.md). Created in start(), inside the loop.
        self.upstream: aiohttp.ClientSession | None = None
        self.runtime = Runtime(config.models, self.session, self.metrics)
        issuer_dir = self.local_issuer_dir()
        self.identity = OIDCBackend(
            config.oidc,
            httpx.AsyncClient(timeout=5.0, trust_env=False),
            None if issuer_dir is None else issuer.jwks_path(issuer_dir),
        )
        self.policy: PolicyEngine | None = None
        self.policy_error = "not started"
        self.audit = AuditLog(
            self.path(config.audit.path),
            load_or_create_private_key(self.path(config.audit.signing_key)),
            checkpoint_records=config.audit.checkpoint_records,
            checkpoint_interval_seconds=config.audit.checkpoint_interval_seconds,
            segment_max_bytes=config.audit.segment_max_bytes,
            profile=config.profile,
        )
        self.lock = LockWatcher(config.lock, facts_for(config_path, config))
        self.memory: Memory | None = None
        self.memory_error = "not started"
        settings = config.listen.tls
        self.tls_files = None if settings is None else tls.server_files(settings, self.path)
        self._retention: asyncio.Task[None] | None = None

    def path(self, value: str) -> Path:
        """A path from the config: relative ones are relative to the config file."""
        return resolve(self.config_path, value)

    def local_issuer_dir(self) -> Path | None:
        directory = self.config.oidc.local_issuer_dir
        return None if directory is None else self.path(directory)

    def session(self) -> aiohttp.ClientSession:
        if self.upstream is None:
            raise ApiError(503, "the gateway is not started", "not_ready")
        return self.upstream

    def require_memory(self) -> Memory:
        if self.memory is None:
            raise ApiError(503, f"memory is unavailable: {self.memory_error}", "memory_unavailable")
        return self.memory

    async def start(self) -> None:
        self.upstream = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1000),
            timeout=aiohttp.ClientTimeout(total=None, connect=UPSTREAM_CONNECT_TIMEOUT_S),
            trust_env=False,
        )
        self._ensure_local_issuer()
        await self.runtime.start()
        await self.audit.open()
        for note in self.audit.recovered:
            log.warning("audit log: %s", note)
        try:
            self.policy = create_engine(
                self.config.policy.engine,
                bundle_dir=self.path(self.config.policy.bundle),
                opa_url=self.config.policy.opa_url,
                decision_path=self.config.policy.decision,
                timeout_seconds=self.config.policy.timeout_seconds,
            )
        except PolicyUnavailable as exc:
            # Fail closed but stay up, so /health can say why and every refusal is audited.
            self.policy_error = str(exc)
            log.error("policy engine unavailable: %s", exc)
        await self.lock_status(startup=True)
        await self._open_memory()

    def _ensure_local_issuer(self) -> None:
        """The local issuer's keys exist before the first token is checked or minted."""
        directory = self.local_issuer_dir()
        if directory is None:
            return
        try:
            issuer.ensure_keys(directory)
        except (issuer.IssuerError, KeyFileError) as exc:
            # Identity then reports not ready in /health, and every request is refused.
            log.error("local issuer unavailable: %s", exc)

    async def _open_memory(self) -> None:
        memory = None
        try:
            memory = await open_memory(self.config.memory, self.path, self.session)
            # A missing ciphertext file is only reported: it may be a volume not mounted yet.
            report = await memory.check(repair=True, shred_missing=False)
        except MemoryFailure as exc:
            # Fail closed for memory alone: chat without retrieval still works; /health says why.
            if memory is not None:
                await memory.close()
            self.memory_error = str(exc)
            log.error("memory unavailable: %s", exc)
            return
        self.memory = memory
        if not report.clean:
            log.warning("memory repaired at start: %s", report.as_dict())
            await self.audit.append(
                {
                    "type": "event",
                    "action": "memory.repair",
                    "resource": "/documents",
                    "memory": report.as_dict(),
                }
            )
        self._retention = asyncio.create_task(self._retention_loop())

    async def _retention_loop(self) -> None:
        async def audited(doc_id: str) -> None:
            # Durable before the document goes: an unaudited deletion never happens.
            await self.audit.append(
                {
                    "type": "event",
                    "action": "memory.retention",
                    "resource": f"/documents/{doc_id}",
                    "memory": {"document": doc_id, "deleted": True},
                }
            )

        while True:
            memory = self.memory
            if memory is not None:
                try:
                    await memory.expire(audited)
                except Exception:
                    log.exception("the retention job failed; it runs again next interval")
            await asyncio.sleep(self.config.memory.retention_interval_seconds)

    async def lock_status(self, startup: bool = False) -> LockStatus:
        """The lock's state now; a change (and the state at start) is audited."""
        status, changed = self.lock.check()
        self.metrics.lock_ok.set(1 if status.ok else 0)
        if changed or startup:
            if not status.ok:
                log.error("compliance lock violation: %s", "; ".join(status.reasons))
            await self.audit.append(
                {
                    "type": "event",
                    "action": "lock.state",
                    "resource": self.config.lock.manifest,
                    "lock": {
                        "state": status.state,
                        "ok": status.ok,
                        "reasons": list(status.reasons),
                    },
                }
            )
        return status

    async def stop(self) -> None:
        if self._retention is not None:
            self._retention.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retention
        if self.memory is not None:
            try:
                await self.memory.close()
            except Exception:
                log.exception("closing the memory failed")
        await self.runtime.stop()
        await self.audit.close()
        if self.policy is not None:
            await self.policy.aclose()
        if self.upstream is not None:
            await self.upstream.close()
