"""The CLI contract: every command documented with an example, errors as `Error: ...`, run-folder and export."""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from xraybatch.cli import main


def _commands(group: click.Group, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    for name, command in group.commands.items():
        yield (*prefix, name), command
        if isinstance(command, click.Group):
            yield from _commands(command, (*prefix, name))


@pytest.mark.parametrize("path", [p for p, _ in _commands(main)], ids=" ".join)
def test_every_command_has_help_with_an_example(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(main, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example:" in result.output


def test_run_folder_without_models_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(
        main, ["run-folder", str(tmp_path / "in"), "--workdir", str(tmp_path / "w"), "--bundle", str(tmp_path / "empty")]
    )
    assert result.exit_code == 1
    assert "Error: no model bundle found" in result.output


def test_bad_config_is_reported(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[ingest]\nmodality = ['CR']\n")
    result = CliRunner().invoke(main, ["config", "show", "--config", str(cfg)])
    assert result.exit_code == 1 and "Error: unknown setting [ingest] 'modality'" in result.output


def test_config_show_reflects_flags(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["config", "show", "--workdir", str(tmp_path), "--db", "sqlite:///x.db"])
    assert result.exit_code == 0
    assert f'workdir = "{tmp_path}"' in result.output and 'url = "sqlite:///x.db"' in result.output


def test_models_list(tiny_bundles: Path) -> None:
    result = CliRunner().invoke(main, ["models", "list", "--bundle", str(tiny_bundles)])
    assert result.exit_code == 0, result.output
    assert "tiny-binary" in result.output and "tiny-multilabel" in result.output and "sha256 ok" in result.output


def test_models_export_writes_checked_onnx_files(tmp_path: Path, tiny_bundles: Path) -> None:
    result = CliRunner().invoke(main, ["models", "export", "--bundle", str(tiny_bundles), "--workdir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    files = sorted((tmp_path / "models").glob("*.onnx"))
    assert [f.name.split("-0.0.1")[0] for f in files] == ["tiny-binary", "tiny-multilabel"]
    lines = result.output.strip().splitlines()
    assert len(lines) == 2 and all("largest difference from torch: probability" in line for line in lines)
    assert str(files[0]) in result.output


def test_run_folder_and_export(tmp_path: Path, tiny_bundles: Path, dicom_factory: Callable[..., Path]) -> None:
    dicom_factory("a")
    dicom_factory("b", view="LL")
    (tmp_path / "in" / "c").write_text("text")
    work = tmp_path / "work"
    runner = CliRunner()
    result = runner.invoke(
        main, ["run-folder", str(tmp_path / "in"), "--workdir", str(work), "--bundle", str(tiny_bundles), "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    assert "3 files" in result.output and "throughput" in result.output

    result = runner.invoke(main, ["results", "export", "--workdir", str(work), "--what", "predictions", "--format", "csv"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(rows) == 16
    required = {"sop_instance_uid", "study_instance_uid", "model", "model_version", "target", "probability",
                "threshold", "positive"}
    assert required <= set(rows[0])
    assert {r["positive"] for r in rows} <= {"true", "false"}
    assert {r["model"] for r in rows} == {"tiny-binary", "tiny-multilabel"}

    out = tmp_path / "instances.json"
    result = runner.invoke(main, ["results", "export", "--workdir", str(work), "--what", "instances", "--format",
                                  "json", "--out", str(out), "--state", "not_applicable"])
    assert result.exit_code == 0, result.output
    instances = json.loads(out.read_text())
    assert [i["state"] for i in instances] == ["not_applicable"]
    assert {"path", "sop_instance_uid", "state", "reason"} <= set(instances[0])
    assert "ViewPosition 'LL'" in instances[0]["reason"]

    result = runner.invoke(main, ["results", "list", "--workdir", str(work)])
    assert result.exit_code == 0 and "rejected" in result.output


@pytest.mark.parametrize(
    "argv",
    [
        ["--log-format", "json", "watch", "/in", "--workers", "3", "--db", "postgresql://h/db"],
        ["watch", "--workers=3", "/in"],
        ["watch", "/in", "--workers", "3"],
    ],
)
def test_watch_workers_rewrite_starts_single_worker_children(argv: list[str]) -> None:
    from xraybatch.cli import single_worker_argv

    child = single_worker_argv(argv)
    assert child[-2:] == ["--workers", "1"]
    assert "3" not in child and "--workers=3" not in child
    assert [a for a in child[:-2]] == [a for a in argv if a not in ("--workers", "3", "--workers=3")]


def test_watch_runs_one_worker_per_core_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No --workers and [pipeline] workers = 0: one worker per core, at most one per 2 GiB available, each a
    `watch ... --workers 1` child of the supervisor; --workers N asks for N."""
    from xraybatch import daemon, settings

    incoming = tmp_path / "in"
    incoming.mkdir()
    calls: list[tuple[list[str], int]] = []
    monkeypatch.setattr(daemon, "run_workers", lambda argv, n, _settings: calls.append((list(argv), n)) or 0)
    monkeypatch.setattr(settings, "available_cores", lambda: 3)
    monkeypatch.setattr(settings, "available_memory", lambda: 64 * 1024**3)
    argv = ["watch", str(incoming), "--workdir", str(tmp_path / "w")]
    for extra, workers in (([], 3), (["--workers", "2"], 2), (["--workers", "0"], 3)):
        monkeypatch.setattr(sys, "argv", ["xraybatch", *argv, *extra])
        result = CliRunner().invoke(main, [*argv, *extra])
        assert result.exit_code == 0, result.output
        assert calls.pop() == ([*argv, "--workers", "1"], workers)
    monkeypatch.setattr(settings, "available_memory", lambda: 5 * 1024**3)  # two workers' worth
    assert settings.host_worker_count(0) == 2 and settings.host_worker_count(5) == 5
    monkeypatch.setattr(settings, "available_cores", lambda: 1)
    assert settings.host_worker_count(0) == 1  # this process is the worker: no supervisor


@pytest.mark.parametrize("command", [["status"], ["results", "list"], ["results", "export", "--what", "instances",
                                                                       "--format", "csv"]])
def test_read_only_commands_never_create_a_database(tmp_path: Path, command: list[str]) -> None:
    workdir = tmp_path / "nothing-here"
    result = CliRunner().invoke(main, [*command, "--workdir", str(workdir)])
    assert result.exit_code == 1, result.output
    assert "Error: no results database at" in result.output
    assert not workdir.exists()
    (tmp_path / "empty.sqlite").touch()  # a file that is not a results database yet
    result = CliRunner().invoke(main, [*command, "--db", f"sqlite:///{tmp_path / 'empty.sqlite'}"])
    assert result.exit_code == 1 and "run `xraybatch db upgrade`" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.sqlite"]


def test_an_unsupported_database_url_scheme_is_a_clear_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["status", "--db", "mysql://u@h/x"])
    assert result.exit_code == 1
    assert "Error: unsupported database URL scheme 'mysql'" in result.output and "postgresql://" in result.output


def test_watch_on_a_missing_drop_folder_is_a_clear_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["watch", str(tmp_path / "absent"), "--workdir", str(tmp_path / "w")])
    assert result.exit_code == 1 and "Error: the drop folder" in result.output and "does not exist" in result.output
    assert not (tmp_path / "absent").exists() and not (tmp_path / "w").exists()


@pytest.mark.postgres
def test_an_unmigrated_postgres_database_says_to_run_db_upgrade(
    tmp_path: Path, tiny_bundles: Path, dicom_factory: Callable[..., Path]
) -> None:
    from tests.integration import throwaway_postgres_database

    dicom_factory("a.dcm")
    with throwaway_postgres_database() as url:
        for command in (["status"], ["results", "list"]):
            result = CliRunner().invoke(main, [*command, "--db", url])
            assert result.exit_code == 1 and "has no xraybatch tables yet: run `xraybatch db upgrade`" in result.output
        result = CliRunner().invoke(
            main, ["run-folder", str(tmp_path / "in"), "--workdir", str(tmp_path / "w"), "--db", url,
                   "--bundle", str(tiny_bundles), "--no-progress"],
            env={"XRAYBATCH_DB_AUTO_UPGRADE": "false"},
        )
        assert result.exit_code == 1 and "run `xraybatch db upgrade`" in result.output, result.output
        assert CliRunner().invoke(main, ["db", "upgrade", "--db", url]).exit_code == 0
        assert CliRunner().invoke(main, ["status", "--db", url]).exit_code == 0


def test_plain_log_lines_are_never_wrapped(capsys: pytest.CaptureFixture[str]) -> None:
    import logging

    from xraybatch.cli import _configure_logging

    saved = {name: (logging.getLogger(name).handlers[:], logging.getLogger(name).level)
             for name in ("xraybatch", "training")}
    try:
        _configure_logging(1, "plain")
        long = "x" * 300
        logging.getLogger("xraybatch.test").info("a long line %s end", long)
    finally:  # leave logging as other tests expect it
        for name, (handlers, level) in saved.items():
            logging.getLogger(name).handlers = handlers
            logging.getLogger(name).setLevel(level)
    lines = [line for line in capsys.readouterr().err.splitlines() if "a long line" in line]
    assert len(lines) == 1 and lines[0].endswith(f"{long} end") and " INFO xraybatch.test: " in lines[0]
