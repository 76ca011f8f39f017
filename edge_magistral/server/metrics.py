"""Prometheus metrics for ``GET /metrics`` (one registry per app, so tests can run several)."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from edge_magistral.generation import Done

PREFIX = "edge_magistral"


class Metrics:
    """What an operator watches: load, latency, token flow, the watchdog, the worker."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(f"{PREFIX}_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens evaluated or reused", registry=r)
        self.completion_tokens = Counter(f"{PREFIX}_completion_tokens",
                                         "Generated tokens (reasoning and answer)", registry=r)
        self.reasoning_tokens = Counter(f"{PREFIX}_reasoning_tokens", "Generated tokens inside [THINK]", registry=r)
        self.tokens_per_s = Histogram(f"{PREFIX}_generation_tokens_per_second", "Generation speed per request",
                                      buckets=(1, 2, 5, 10, 20, 35, 50, 75, 100, 150, 250, 500, 1000), registry=r)
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds",
                              "Request arrival to first generated text (queue wait included)",
                              buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120), registry=r)
        self.duration = Histogram(f"{PREFIX}_request_duration_seconds", "Generation requests, arrival to end",
                                  buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600), registry=r)
        self.queue_depth = Gauge(f"{PREFIX}_queue_depth", "Requests waiting for the engine", registry=r)
        self.generating = Gauge(f"{PREFIX}_generating", "1 while the engine runs a request", registry=r)
        self.slots_busy = Gauge(f"{PREFIX}_slots_busy", "Decoding slots running a request", registry=r)
        self.slots = Gauge(f"{PREFIX}_slots", "Decoding slots of the loaded engine (--parallel)", registry=r)
        self.watchdog = Counter(f"{PREFIX}_watchdog_interventions",
                                "[THINK] watchdog interventions by action and reason", ["action", "reason"], registry=r)
        self.model_memory = Gauge(f"{PREFIX}_model_memory_bytes", "Model memory per device as planned",
                                  ["device", "part"], registry=r)
        self.worker_rss = Gauge(f"{PREFIX}_worker_resident_memory_bytes", "Resident memory of the model worker",
                                registry=r)
        self.worker_up = Gauge(f"{PREFIX}_worker_up", "1 when the model worker is loaded and ready", registry=r)
        self.worker_restarts = Counter(f"{PREFIX}_worker_failures", "Model worker failures by reason: crashed, "
                                       "hung, killed (a SIGKILL we did not send: the OOM killer, most likely)",
                                       ["reason"], registry=r)
        self.cancelled = Counter(f"{PREFIX}_cancelled_requests", "Requests cancelled because the client left or "
                                 "fell behind, by the stage reached: queued (never run), prompt, generating",
                                 ["stage"], registry=r)
        self.connections_closed = Counter(f"{PREFIX}_connections_closed", "Connections the server closed: "
                                          "header_timeout, send_timeout (a stalled reader), idle_evicted",
                                          ["reason"], registry=r)
        self.drafted = Counter(f"{PREFIX}_speculative_drafted_tokens",
                               "Speculative guesses verified by the model (n-gram or draft model)", registry=r)
        self.accepted = Counter(f"{PREFIX}_speculative_accepted_tokens",
                                "Speculative guesses the model agreed with (each a token for a shared step)",
                                registry=r)
        self.acceptance = Gauge(f"{PREFIX}_speculative_acceptance_rate",
                                "Accepted / drafted guesses since the service started (0 before any)", registry=r)
        self.speculate = Gauge(f"{PREFIX}_speculate_mode", "1 for the loaded engine's speculative decoding mode "
                               "(ngram, draft, off)", ["mode"], registry=r)
        self._drafted = self._accepted = 0  # the counters' totals, for the rate
        self._rss_at = 0.0

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # -- hooks for the supervisor
    def worker_ready(self, info: dict[str, Any]) -> None:
        self.worker_up.set(1)
        plan = info.get("plan", {})
        for dev in plan.get("memory", []):
            for part in ("weights", "kv_cache", "compute", "overhead"):
                self.model_memory.labels(dev.get("device", "?"), part).set(dev.get(part, 0))
        self.speculate.clear()
        if plan.get("speculate"):
            self.speculate.labels(plan["speculate"]).set(1)

    def worker_down(self, why: str) -> None:
        self.worker_up.set(0)
        reason = "hung" if why.startswith(("hung", "still loading")) else "killed" if why == "killed" else "crashed"
        self.worker_restarts.labels(reason).inc()

    def observe_supervisor(self, sup: Any) -> None:
        self.generating.set(1 if sup.running else 0)
        self.slots_busy.set(len(sup.running))
        self.slots.set(sup.n_slots)
        now = time.monotonic()
        if now - self._rss_at < 5 or sup.worker_pid is None:
            return
        self._rss_at = now
        try:
            import psutil

            self.worker_rss.set(psutil.Process(sup.worker_pid).memory_info().rss)
        except Exception:  # the worker may be gone between the check and the read
            pass

    # -- per request
    def finished(self, done: Done, ttft_s: float | None, duration_s: float) -> None:
        u = done.usage
        self.prompt_tokens.inc(u.prompt_tokens)
        self.completion_tokens.inc(u.completion_tokens)
        self.reasoning_tokens.inc(u.reasoning_tokens)
        if done.timings.tokens_per_s > 0:
            self.tokens_per_s.observe(done.timings.tokens_per_s)
        if ttft_s is not None:
            self.ttft.observe(ttft_s)
        self.duration.observe(duration_s)
        for ev in done.watchdog_events:
            self.watchdog.labels(ev.get("action", "?"), ev.get("reason", "?")).inc()
        self._speculated(done.timings.drafted_tokens, done.timings.accepted_tokens)

    def _speculated(self, drafted: int, accepted: int) -> None:
        self.drafted.inc(drafted)
        self.accepted.inc(accepted)
        self._drafted += drafted
        self._accepted += accepted
        if self._drafted:
            self.acceptance.set(self._accepted / self._drafted)
