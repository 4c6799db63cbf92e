"""Prometheus metrics of one ``xraybatch watch`` worker, served over HTTP by prometheus_client.

Off unless ``[watch] metrics_port`` is set. Each worker process serves its own counters (with ``--workers N``
worker ``i`` listens on ``metrics_port + i``); the queue depth is the shared queue's, the same in every worker.
No label carries a UID, a path or anything else about a patient.

- ``xraybatch_instances_total`` (counter, label ``state``): input files this worker brought to a final state.
- ``xraybatch_stage_seconds`` (histogram, label ``stage``): time per image in each pipeline stage (header,
  claim, decode, preprocess, infer, explain, writeback, persist).
- ``xraybatch_queue_depth`` (gauge): queued instances waiting in the results DB.
- ``xraybatch_transient_faults_total`` (counter): episodes of transient faults (DB unreachable, disk full),
  each counted once however long it lasts.
- ``xraybatch_worker_info`` (gauge, 1; labels ``worker_id``, ``model_set``): which worker and models.
- ``xraybatch_deliveries_total`` (counter, labels ``destination``, ``state``): answers of the delivery
  destinations per output: ``sent``, ``failed`` (refused), ``pending`` (no answer; retried).
- ``xraybatch_delivery_faults_total`` (counter, label ``destination``): episodes of a destination being
  unreachable, each counted once however long it lasts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server

from xraybatch.domain import Outcome

logger = logging.getLogger(__name__)

# Stage times run from a millisecond (header) to seconds (JPEG 2000 decode of a large film, a slow disk).
_STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class WorkerMetrics:
    """The metrics of one worker, in a registry of its own (so tests and several daemons do not share one)."""

    def __init__(self, worker_id: str) -> None:
        self.registry = CollectorRegistry()
        self.instances = Counter(
            "xraybatch_instances", "Input files this worker brought to a final state.", ["state"],
            registry=self.registry,
        )
        self.stage_seconds = Histogram(
            "xraybatch_stage_seconds", "Time per image in each pipeline stage.", ["stage"],
            buckets=_STAGE_BUCKETS, registry=self.registry,
        )
        self.queue_depth = Gauge(
            "xraybatch_queue_depth", "Queued instances waiting in the results DB (all workers).",
            registry=self.registry,
        )
        self.transient_faults = Counter(
            "xraybatch_transient_faults", "Episodes of transient faults (DB unreachable, disk full).",
            registry=self.registry,
        )
        self._info = Gauge("xraybatch_worker_info", "This worker and the models it runs.", ["worker_id", "model_set"],
                           registry=self.registry)
        self.deliveries = Counter(
            "xraybatch_deliveries", "Answers of the delivery destinations per output (sent, failed, pending).",
            ["destination", "state"], registry=self.registry,
        )
        self.delivery_faults = Counter(
            "xraybatch_delivery_faults", "Episodes of a delivery destination being unreachable.", ["destination"],
            registry=self.registry,
        )
        self._worker_id = worker_id
        self._stop: Callable[[], None] | None = None

    def models_loaded(self, model_set: str) -> None:
        """Label the worker with the models in force (``name@version,...``)."""
        self._info.clear()
        self._info.labels(worker_id=self._worker_id, model_set=model_set).set(1)

    def record(self, outcome: Outcome) -> None:
        """Count a final outcome and observe its stage times."""
        self.instances.labels(state=str(outcome.state)).inc()
        for stage, seconds in outcome.timings.items():
            self.stage_seconds.labels(stage=stage).observe(seconds)

    def delivered(self, destination: str, state: str) -> None:
        """Count one delivery answer (``sent``, ``failed`` or ``pending``) of ``destination``."""
        self.deliveries.labels(destination=destination, state=state).inc()

    def delivery_fault(self, destination: str) -> None:
        """Count the start of an episode in which ``destination`` cannot be reached."""
        self.delivery_faults.labels(destination=destination).inc()

    def text(self) -> str:
        """The metrics in the Prometheus text format (what the HTTP endpoint serves)."""
        return generate_latest(self.registry).decode()

    def serve(self, port: int, address: str) -> bool:
        """Serve ``/metrics`` on ``address:port`` in a background thread; ``False`` (and an error logged) if it cannot.

        A port in use or a bad address costs the metrics, never the processing.
        """
        try:
            server: Any
            server, _thread = start_http_server(port, address, registry=self.registry)
        except OSError as err:
            logger.error("metrics not served on %s:%d: %s", address, port, err)
            return False

        def stop() -> None:
            server.shutdown()
            server.server_close()  # frees the port

        self._stop = stop
        logger.info("metrics on http://%s:%d/metrics", address, port)
        return True

    def close(self) -> None:
        """Stop serving."""
        if self._stop is not None:
            self._stop()
            self._stop = None
