"""Alembic migrations: round trip, models equal migrations, the partial unique index, the command line."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, inspect, text
from sqlalchemy.exc import IntegrityError

from tests.integration import throwaway_postgres_database
from xraybatch.db import current_revision, downgrade, head_revision, make_engine, upgrade
from xraybatch.db.tables import LIVE_STATES, Base

REPO_ROOT = Path(__file__).resolve().parents[2]
TABLES = {"instances", "predictions", "outputs", "model_versions", "workers", "deliveries"}
HEAD = "0004"


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    with throwaway_postgres_database() as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """URL of an empty database; PostgreSQL is downgraded to empty again afterwards."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'xraybatch.sqlite'}"
        return
    url = request.getfixturevalue("postgres_url")
    yield url
    downgrade(url, "base")


def tables(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names()) - {"alembic_version"}


def test_upgrade_downgrade_upgrade(db_url: str) -> None:
    assert head_revision() == HEAD
    assert current_revision(db_url) is None
    upgrade(db_url)
    assert current_revision(db_url) == HEAD
    upgrade(db_url)  # already at head: nothing to do
    downgrade(db_url, "base")
    assert current_revision(db_url) is None
    engine = make_engine(db_url)
    assert tables(engine) == set()
    upgrade(db_url, "0001")
    assert current_revision(db_url) == "0001"
    assert tables(engine) == TABLES - {"workers", "deliveries"}
    upgrade(db_url)
    assert tables(engine) == TABLES
    engine.dispose()


@pytest.mark.postgres
def test_workers_upgrading_together_take_turns(postgres_url: str) -> None:
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(upgrade, postgres_url) for _ in range(3)]
    try:
        assert [f.result() for f in futures] == [None, None, None]  # re-raises a worker's error
        assert current_revision(postgres_url) == HEAD
    finally:
        downgrade(postgres_url, "base")


def test_0003_lets_copies_wait_and_its_downgrade_keeps_one_live_copy(db_url: str) -> None:
    """0003: queued copies of one UID may wait side by side; downgrading turns the later ones into duplicates."""
    upgrade(db_url, "0002")
    engine = make_engine(db_url)
    insert = text(
        "INSERT INTO instances (path, sop_instance_uid, state, reason, notes, attempts, timings, model_set, "
        "received_at, updated_at, file_path) VALUES (:path, :uid, :state, '', '[]', 0, '{}', 'm', "
        "CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, :file)"
    )
    with engine.begin() as conn:
        conn.execute(insert, {"path": "/in/old", "uid": "1.2.3", "state": "done", "file": None})
        conn.execute(insert, {"path": "/in/w", "uid": "1.2.4", "state": "queued", "file": "/w/inflight/1"})
    upgrade(db_url, "0003")
    with engine.begin() as conn:
        sources = dict(conn.execute(text("SELECT path, source FROM instances")).all())
        assert sources == {"/in/old": "run-folder:", "/in/w": "watch"}
        conn.execute(insert, {"path": "/in/w2", "uid": "1.2.4", "state": "queued", "file": "/w/inflight/2"})
        conn.execute(insert, {"path": "/in/again", "uid": "1.2.3", "state": "queued", "file": "/w/inflight/3"})
    with pytest.raises(IntegrityError), engine.begin() as conn:
        conn.execute(insert, {"path": "/in/twice", "uid": "1.2.3", "state": "done", "file": None})
    downgrade(db_url, "0002")
    with engine.begin() as conn:
        states = dict(conn.execute(text("SELECT path, state FROM instances")).all())
    assert states == {"/in/old": "done", "/in/w": "queued", "/in/w2": "duplicate", "/in/again": "duplicate"}
    engine.dispose()
    downgrade(db_url, "base")


def test_models_match_migrations(db_url: str) -> None:
    upgrade(db_url)
    engine = make_engine(db_url)
    with engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "target_metadata": Base.metadata}
        )
        assert compare_metadata(context, Base.metadata) == []
    engine.dispose()


def test_live_uid_index_is_unique_and_partial(db_url: str) -> None:
    """Autogenerate ignores index predicates, so check the WHERE clause here."""
    upgrade(db_url)
    engine = make_engine(db_url)
    (index,) = [i for i in inspect(engine).get_indexes("instances") if i["name"] == "uq_instances_live_sop_model"]
    engine.dispose()
    assert index["unique"] and index["column_names"] == ["sop_instance_uid", "model_set"]
    where = str(index["dialect_options"][f"{engine.dialect.name}_where"])
    assert set(re.findall(r"'(\w+)'", where)) == set(LIVE_STATES)


def test_upgrade_leaves_application_logging_alone(tmp_path: Path) -> None:
    app_logger = logging.getLogger("xraybatch.db.test")
    root = logging.getLogger()
    before = (list(root.handlers), root.level, app_logger.disabled)
    upgrade(f"sqlite:///{tmp_path / 'x.sqlite'}")
    assert (list(root.handlers), root.level, app_logger.disabled) == before


def test_alembic_command_line(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.sqlite'}"
    env = {k: v for k, v in os.environ.items() if k != "XRAYBATCH_DB_URL"}

    def alembic(*args: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "alembic", *args],
            check=False,
            cwd=REPO_ROOT,
            env={**env, **extra_env},
            capture_output=True,
            text=True,
            timeout=120,
        )

    done = alembic("-x", f"url={url}", "upgrade", "head")
    assert done.returncode == 0, done.stderr
    assert "Running upgrade  -> 0001" in done.stderr and "Running upgrade 0002 -> 0003" in done.stderr
    assert current_revision(url) == HEAD
    current = alembic("current", XRAYBATCH_DB_URL=url)
    assert current.returncode == 0 and f"{HEAD} (head)" in current.stdout
    missing = alembic("current")
    assert missing.returncode != 0 and "XRAYBATCH_DB_URL" in missing.stderr
