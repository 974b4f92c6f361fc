"""The product's own metrics: counted where things happen, exported by whoever installs a sink.

A worker installs the Temporal SDK's metric meter as the sink, so these series sit beside
the SDK's runtime metrics on the worker's Prometheus port (`JOURNEYS_WORKER_METRICS_ADDRESS`).
`journeys api` installs prometheus-client instead, so what the API itself records
(external segment entries) shows on its `/metrics`. A process without a sink (a CLI
command, a test) drops them. Labels are bounded:
outcomes, channels, kinds and stages are closed sets, and a transition's source is cut to
its prefix (`rfm-pass`, not `rfm-pass:42`). docs/production.md lists every series.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, Protocol

from temporalio import activity
from temporalio.common import MetricMeter
from temporalio.worker import (
    ActivityInboundInterceptor,
    ExecuteActivityInput,
    Interceptor,
)


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: Literal["counter", "histogram"]
    description: str
    labels: tuple[str, ...] = ()
    unit: str = ""
    buckets: tuple[float, ...] = ()


SENDS = MetricSpec(
    "journeys_sends",
    "counter",
    "send_message attempts by channel and outcome: sent, skipped, failed, in_doubt,"
    " deferred, or retry (the provider failed or did not answer; Temporal tries again)",
    ("channel", "outcome"),
)
SEGMENT_ENTRIES = MetricSpec(
    "journeys_segment_entries", "counter", "customers who entered a segment, by source", ("source",)
)
SEGMENT_EXITS = MetricSpec(
    "journeys_segment_exits", "counter", "customers who left a segment, by source", ("source",)
)
REALTIME_LAG = MetricSpec(
    "journeys_realtime_lag_seconds",
    "histogram",
    "age of the oldest event of each real-time batch when the processor claimed it",
    (),
    "s",
    (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 1800),
)
PASS_DURATION = MetricSpec(
    "journeys_pass_duration_seconds",
    "histogram",
    "duration of RFM passes, segment passes and real-time batches, by kind and outcome",
    ("kind", "outcome"),
    "s",
    (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600),
)
QUARANTINED = MetricSpec(
    "journeys_quarantined",
    "counter",
    "records set aside by background work (the failures table), by kind and stage",
    ("kind", "stage"),
)
ALL = (SENDS, SEGMENT_ENTRIES, SEGMENT_EXITS, REALTIME_LAG, PASS_DURATION, QUARANTINED)


class MetricSink(Protocol):
    def record(self, spec: MetricSpec, value: float, labels: Mapping[str, str]) -> None: ...


class TemporalMeterSink:
    """Records on the SDK's metric meter, so its Prometheus endpoint serves ours too."""

    def __init__(self, meter: MetricMeter) -> None:
        self._instruments: dict[str, Any] = {}
        for spec in ALL:
            if spec.kind == "counter":
                self._instruments[spec.name] = meter.create_counter(
                    spec.name, spec.description, spec.unit or None
                )
            else:
                self._instruments[spec.name] = meter.create_histogram_float(
                    spec.name, spec.description, spec.unit or None
                )

    def record(self, spec: MetricSpec, value: float, labels: Mapping[str, str]) -> None:
        instrument = self._instruments[spec.name]
        if spec.kind == "counter":
            instrument.add(int(value), dict(labels))
        else:
            instrument.record(float(value), dict(labels))


def histogram_buckets() -> dict[str, Sequence[float]]:
    """Bucket bounds of our histograms, for the SDK's Prometheus exporter."""
    return {spec.name: spec.buckets for spec in ALL if spec.kind == "histogram"}


_sink: MetricSink | None = None


def install(sink: MetricSink | None) -> None:
    """Send this process's product metrics to `sink` (None: drop them)."""
    global _sink
    _sink = sink


def _record(spec: MetricSpec, value: float, **labels: str) -> None:
    sink = _sink
    if sink is not None:
        sink.record(spec, value, labels)


def source_kind(source: str) -> str:
    """`rfm-pass:42` -> `rfm-pass`: the label, without the pass or segment it names."""
    return source.partition(":")[0][:40] or "unknown"


def count_send(channel: str, outcome: str) -> None:
    _record(SENDS, 1, channel=channel, outcome=outcome)


def count_segment_changes(source: str, *, entries: int, exits: int) -> None:
    if entries:
        _record(SEGMENT_ENTRIES, entries, source=source_kind(source))
    if exits:
        _record(SEGMENT_EXITS, exits, source=source_kind(source))


def observe_realtime_lag(received: Sequence[datetime | None], now: datetime) -> None:
    """The oldest claimed event's wait, from `received_at` to the claim."""
    times = [t for t in received if t is not None]
    if times:
        _record(REALTIME_LAG, max(0.0, (now - min(times)).total_seconds()))


def observe_pass(kind: str, seconds: float, *, outcome: str = "ok") -> None:
    _record(PASS_DURATION, seconds, kind=kind, outcome=outcome)


def count_quarantined(kind: str, stage: str) -> None:
    _record(QUARANTINED, 1, kind=kind, stage=stage)


class ActivityMetrics(Interceptor):
    """Counts what activities decide without touching their code: each send_message
    outcome, and the duration of each pass activity."""

    def __init__(self, *, send_activity: str, passes: Mapping[str, str]) -> None:
        self.send_activity = send_activity
        self.passes = dict(passes)

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _ActivityMetricsInbound(next, self)


class _ActivityMetricsInbound(ActivityInboundInterceptor):
    def __init__(self, next: ActivityInboundInterceptor, owner: ActivityMetrics) -> None:
        super().__init__(next)
        self.owner = owner

    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        name = activity.info().activity_type
        if name == self.owner.send_activity:
            return await self._send(input)
        kind = self.owner.passes.get(name)
        if kind is None:
            return await super().execute_activity(input)
        started = time.perf_counter()
        outcome = "error"
        try:
            result = await super().execute_activity(input)
            outcome = "ok"
            return result
        finally:
            observe_pass(kind, time.perf_counter() - started, outcome=outcome)

    async def _send(self, input: ExecuteActivityInput) -> Any:
        channel = str(getattr(input.args[0], "channel", "unknown")) if input.args else "unknown"
        try:
            result = await super().execute_activity(input)
        except Exception:  # a cancelled attempt (worker shutting down) is not counted
            count_send(channel, "retry")
            raise
        count_send(channel, str(getattr(result, "status", "unknown")))
        return result
