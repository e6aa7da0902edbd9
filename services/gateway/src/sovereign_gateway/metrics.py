"""The gateway's Prometheus metrics: requests, decisions, latencies, audit, lock, runtime.

Takes nothing global: each app owns a `Metrics` with its own registry, so two apps in one
process (tests, benchmarks) never share counters. Gives `/metrics` in the text format.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Gateway overhead is sub-millisecond; upstream time can be minutes.
_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120,
)  # fmt: skip
_DECISION_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.01, 0.1, 1)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "sovereign_gateway_requests",
            "Requests answered, by endpoint and HTTP status.",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "sovereign_gateway_request_duration_seconds",
            "Time from request to the last response byte, by endpoint.",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.decisions = Counter(
            "sovereign_gateway_policy_decisions",
            "Policy decisions, by engine and result (allow, deny, error).",
            ["engine", "result"],
            registry=self.registry,
        )
        self.decision_latency = Histogram(
            "sovereign_gateway_policy_decision_duration_seconds",
            "Time to obtain one policy decision, by engine.",
            ["engine"],
            buckets=_DECISION_BUCKETS,
            registry=self.registry,
        )
        self.auth_failures = Counter(
            "sovereign_gateway_auth_failures",
            "Requests refused by authentication, by RFC 6750 error code.",
            ["error"],
            registry=self.registry,
        )
        self.audit_records = Counter(
            "sovereign_gateway_audit_records",
            "Audit records made durable.",
            registry=self.registry,
        )
        self.audit_failures = Counter(
            "sovereign_gateway_audit_failures",
            "Audit appends that failed; each such request was answered 503.",
            registry=self.registry,
        )
        self.lock_ok = Gauge(
            "sovereign_gateway_compliance_lock_ok",
            "1 while the compliance lock holds (or is absent and not required), else 0.",
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "sovereign_gateway_backend_in_flight",
            "Requests running on a model's replicas.",
            ["model"],
            registry=self.registry,
        )
        self.queued = Gauge(
            "sovereign_gateway_backend_queued",
            "Requests waiting for a slot on a model's replicas.",
            ["model"],
            registry=self.registry,
        )
        self.rejected = Counter(
            "sovereign_gateway_backend_rejected",
            "Requests answered 429, by model and reason (queue_full, queue_timeout).",
            ["model", "reason"],
            registry=self.registry,
        )
        self.failovers = Counter(
            "sovereign_gateway_backend_failovers",
            "Requests moved to another replica because one was down.",
            ["model"],
            registry=self.registry,
        )
        self.worker_restarts = Counter(
            "sovereign_gateway_worker_restarts",
            "Embedded engine workers started again after they died or hung.",
            ["model"],
            registry=self.registry,
        )
        self.tokens = Counter(
            "sovereign_gateway_tokens",
            "Tokens processed, by model and kind (prompt, completion).",
            ["model", "kind"],
            registry=self.registry,
        )
        self.first_token = Histogram(
            "sovereign_gateway_time_to_first_token_seconds",
            "Time from request to the first streamed content byte, by model.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
