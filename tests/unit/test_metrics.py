"""The watch worker's Prometheus metrics: what they count, the HTTP endpoint, and the ports of several workers."""

from __future__ import annotations

import logging
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from xraybatch.daemon import worker_environ
from xraybatch.domain import Outcome, State
from xraybatch.metrics import WorkerMetrics


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text page, keyed by name and sorted labels."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.fixture
def metrics() -> Iterator[WorkerMetrics]:
    m = WorkerMetrics("host:1:abc")
    yield m
    m.close()


def test_outcomes_are_counted_by_state_with_their_stage_times(metrics: WorkerMetrics) -> None:
    metrics.models_loaded("nih@1,pneumonia@1")
    metrics.record(Outcome(Path("/in/a"), State.DONE, timings={"decode": 0.2, "infer": 0.03}))
    metrics.record(Outcome(Path("/in/b"), State.DONE, timings={"decode": 0.4}))
    metrics.record(Outcome(Path("/in/c"), State.REJECTED, "not a DICOM file"))
    metrics.queue_depth.set(7)
    metrics.transient_faults.inc()
    got = samples(metrics.text())
    assert got[("xraybatch_instances_total", (("state", "done"),))] == 2
    assert got[("xraybatch_instances_total", (("state", "rejected"),))] == 1
    assert got[("xraybatch_stage_seconds_count", (("stage", "decode"),))] == 2
    assert got[("xraybatch_stage_seconds_sum", (("stage", "decode"),))] == pytest.approx(0.6)
    assert got[("xraybatch_stage_seconds_bucket", (("le", "0.25"), ("stage", "decode")))] == 1
    assert got[("xraybatch_stage_seconds_count", (("stage", "infer"),))] == 1
    assert got[("xraybatch_queue_depth", ())] == 7
    assert got[("xraybatch_transient_faults_total", ())] == 1
    assert got[("xraybatch_worker_info", (("model_set", "nih@1,pneumonia@1"), ("worker_id", "host:1:abc")))] == 1


def test_new_models_replace_the_info_label(metrics: WorkerMetrics) -> None:
    metrics.models_loaded("a@1")
    metrics.models_loaded("a@2")
    info = {k: v for k, v in samples(metrics.text()).items() if k[0] == "xraybatch_worker_info"}
    assert list(info) == [("xraybatch_worker_info", (("model_set", "a@2"), ("worker_id", "host:1:abc")))]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_endpoint_serves_the_page(metrics: WorkerMetrics) -> None:
    port = _free_port()
    assert metrics.serve(port, "127.0.0.1")
    metrics.record(Outcome(Path("/in/a"), State.DUPLICATE, "already received"))
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        page = response.read().decode()
    assert samples(page)[("xraybatch_instances_total", (("state", "duplicate"),))] == 1
    metrics.close()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_a_port_in_use_costs_the_metrics_not_the_worker(
    metrics: WorkerMetrics, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = int(taken.getsockname()[1])
        with caplog.at_level(logging.ERROR):
            assert metrics.serve(port, "127.0.0.1") is False
    assert f"metrics not served on 127.0.0.1:{port}" in caplog.text


def test_each_worker_of_several_gets_its_own_port() -> None:
    base = {"PATH": "/bin", "XRAYBATCH_WATCH_METRICS_PORT": "9100"}
    assert [worker_environ(base, 9100, i)["XRAYBATCH_WATCH_METRICS_PORT"] for i in range(3)] == [
        "9100", "9101", "9102"
    ]
    off = worker_environ({"PATH": "/bin"}, 0, 1)  # metrics off: no port; never a migration in a worker
    assert "XRAYBATCH_WATCH_METRICS_PORT" not in off and off["XRAYBATCH_DB_AUTO_UPGRADE"] == "false"


def test_each_worker_of_several_gets_its_share_of_the_cores_through_its_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from xraybatch import settings as settings_module
    from xraybatch.settings import Settings, for_worker, load_settings

    monkeypatch.setattr(settings_module, "available_cores", lambda: 4)
    env = worker_environ({"PATH": "/bin"}, 0, 0, for_worker(Settings(), 2))
    assert env["XRAYBATCH_MODEL_THREADS"] == "2" and env["XRAYBATCH_PIPELINE_DECODE_PROCESSES"] == "1"
    worker = load_settings(environ=env)  # what the worker process resolves
    assert worker.model.threads == 2 and worker.pipeline.decode_processes == 1
