"""Integration tests: real SQLite files, the real PostgreSQL server, Alembic migrations."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

# Server used by the tests marked ``postgres``; a database on it is created per test module and dropped after.
POSTGRES_ADMIN_URL = os.environ.get(
    "XB_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


@contextmanager
def throwaway_postgres_database() -> Iterator[str]:
    """Create a uniquely named database, yield its URL, then drop it; skip when the server is unreachable."""
    admin = create_engine(
        POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3}
    )
    name = f"xb_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except OperationalError as err:
        admin.dispose()
        where = make_url(POSTGRES_ADMIN_URL)
        pytest.skip(f"PostgreSQL on {where.host}:{where.port or 5432} not reachable: {err.orig}")
    try:
        yield make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
