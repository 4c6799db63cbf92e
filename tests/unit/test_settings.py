"""Settings precedence (defaults < TOML < environment < flags) and fatal errors at start-up."""

from __future__ import annotations

from pathlib import Path

import pytest

from xraybatch.errors import ConfigError
from xraybatch.settings import Settings, as_toml, available_cores, for_worker, load_settings, worker_count


def test_defaults() -> None:
    s = load_settings(environ={})
    assert s == Settings()
    assert s.ingest.views == ("PA", "AP") and s.explain.max_findings == 3
    assert s.db_url.startswith("sqlite:///") and s.db_url.endswith("xraybatch-data/xraybatch.sqlite")


def test_precedence(tmp_path: Path) -> None:
    cfg = tmp_path / "x.toml"
    cfg.write_text('workdir = "/srv/a"\n[db]\nurl = "sqlite:///file.db"\n[explain]\nmax_findings = 5\n'
                   '[ingest]\nviews = ["PA"]\n')
    s = load_settings(cfg, environ={})
    assert (s.workdir, s.db.url, s.explain.max_findings, s.ingest.views) == (Path("/srv/a"), "sqlite:///file.db", 5, ("PA",))
    env = {"XRAYBATCH_EXPLAIN_MAX_FINDINGS": "2", "XRAYBATCH_INGEST_VIEWS": "PA,AP,LL", "XRAYBATCH_WORKDIR": "/srv/b"}
    s = load_settings(cfg, environ=env)
    assert (s.workdir, s.explain.max_findings, s.ingest.views) == (Path("/srv/b"), 2, ("PA", "AP", "LL"))
    s = load_settings(cfg, {"workdir": "/srv/c", "db": {"url": None}}, environ=env)
    assert s.workdir == Path("/srv/c") and s.db.url == "sqlite:///file.db"  # None flags do not override


@pytest.mark.parametrize(
    ("toml", "match"),
    [
        ("[ingest]\nviewz = ['PA']\n", r"unknown setting \[ingest\] 'viewz'"),
        ("[nope]\nx = 1\n", r"unknown setting 'nope'"),
        ("[explain]\nmax_findings = 'many'\n", r"\[explain\] max_findings: expected an integer"),
        ("[pipeline]\nbatch_size = 0\n", r"batch_size must be >= 1"),
        ("[preprocess]\npercentile_window = [99, 1]\n", r"percentile_window must be two percentiles"),
        ("[db]\nurl = \n", r"not valid TOML"),
        ("[watch]\nmetrics_port = 70000\n", r"metrics_port must be a TCP port"),
    ],
)
def test_bad_config_is_fatal_with_a_fix(tmp_path: Path, toml: str, match: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(toml)
    with pytest.raises(ConfigError, match=match):
        load_settings(cfg, environ={})


def test_unknown_environment_variable() -> None:
    with pytest.raises(ConfigError, match="XRAYBATCH_DB_URI"):
        load_settings(environ={"XRAYBATCH_DB_URI": "x"})


def test_as_toml_round_trips(tmp_path: Path) -> None:
    s = load_settings(None, {"workdir": "/srv/x", "ingest": {"views": ["PA"]}, "explain": {"enabled": False}}, environ={})
    path = tmp_path / "out.toml"
    path.write_text(as_toml(s))
    assert load_settings(path, environ={}) == s


def test_the_input_gate_is_on_by_default_and_turned_off_by_file_or_environment(tmp_path: Path) -> None:
    assert load_settings(environ={}).gate.enabled is True
    assert load_settings(environ={"XRAYBATCH_GATE_ENABLED": "false"}).gate.enabled is False
    cfg = tmp_path / "x.toml"
    cfg.write_text("[gate]\nenabled = false\n")
    assert load_settings(cfg, environ={}).gate.enabled is False
    cfg.write_text("[gate]\nenabled = 'sometimes'\n")
    with pytest.raises(ConfigError, match=r"\[gate\] enabled: expected true/false"):
        load_settings(cfg, environ={})


def test_run_folder_workers_default_to_one_per_core_at_most_one_per_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    from xraybatch import settings as settings_module

    assert Settings().pipeline.workers == 0
    assert available_cores() >= 1
    monkeypatch.setattr(settings_module, "available_cores", lambda: 4)
    monkeypatch.setattr(settings_module, "available_memory", lambda: 64 * 1024**3)
    assert worker_count(0, 1000, 8) == 4
    assert worker_count(0, 17, 8) == 3  # three batches
    assert worker_count(0, 8, 8) == 1 and worker_count(0, 0, 8) == 1
    assert worker_count(2, 1, 8) == 2  # asked for: as asked
    monkeypatch.setattr(settings_module, "available_memory", lambda: 5 * 1024**3)
    assert worker_count(0, 1000, 8) == 2  # one per 2 GiB available
    monkeypatch.setattr(settings_module, "available_memory", lambda: 1024**3)
    assert worker_count(0, 1000, 8) == 1
    with pytest.raises(ConfigError, match=r"workers must be >= 0"):
        load_settings(None, {"pipeline": {"workers": -1}}, environ={})


def test_each_of_several_workers_gets_its_share_of_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    from xraybatch import settings as settings_module

    monkeypatch.setattr(settings_module, "available_cores", lambda: 8)
    base = load_settings(environ={})
    assert for_worker(base, 1) == base  # one worker: as configured (its own decode processes)
    each = for_worker(base, 2)
    assert each.model.threads == 4 and each.pipeline.decode_processes == 1
    assert for_worker(base, 16).model.threads == 1
    pinned = load_settings(None, {"model": {"threads": 3}}, environ={})
    assert for_worker(pinned, 2).model.threads == 3  # [model] threads set by the site wins
