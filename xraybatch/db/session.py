"""Engines, sessions and Alembic migrations for the results database.

SQLite (``sqlite:///PATH``) is the default, in WAL mode with foreign keys on and a 30 s busy timeout;
PostgreSQL (``postgresql://user@host/db``, driven by psycopg 3) serves several workers. Migrations run through
the Alembic command API with a configuration built in code, so they never touch the application's logging::

    engine = make_engine(settings.db_url)
    upgrade(engine)
    Session = make_sessionmaker(engine)
    with Session() as session:
        ...
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event, text
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from xraybatch.errors import PersistError

logger = logging.getLogger(__name__)

ALEMBIC_DIR = Path(__file__).resolve().parents[1] / "migrations"  # package data: a wheel install can migrate
SQLITE_BUSY_TIMEOUT_MS = 30_000
POSTGRES_CONNECT_TIMEOUT_S = 10  # default when the URL sets no connect_timeout
MIGRATION_LOCK_KEY = 0x78726179  # PostgreSQL advisory lock held while migrating ("xray")
FIX_HINT = (
    "check [db] url / XRAYBATCH_DB_URL, that the database server is up and reachable, and that the schema is "
    "current (`xraybatch db upgrade`)"
)


def normalise_url(url: str | URL) -> URL:
    """Parse ``url``, selecting psycopg 3 for ``postgresql://`` and ``postgres://``.

    Raises
    ------
    PersistError
        When ``url`` is not a database URL.
    """
    try:
        parsed = make_url(url)
    except ArgumentError as err:
        raise PersistError(
            f"the database URL is not valid ({err}); set [db] url / XRAYBATCH_DB_URL to sqlite:///PATH "
            "or postgresql://USER@HOST/DB"
        ) from err
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise PersistError(
            f"unsupported database URL scheme {parsed.drivername!r}: xraybatch supports sqlite:///PATH and "
            "postgresql://USER@HOST/DB; set [db] url / XRAYBATCH_DB_URL"
        )
    return parsed


def open_existing(url: str | URL) -> Engine:
    """An engine for a results database that must exist already: for read-only commands (``status``, ``results``).

    Nothing is created: no folder, no SQLite file, no tables.

    Raises
    ------
    PersistError
        When the SQLite file does not exist, the database has no xraybatch tables, or cannot be reached.
    """
    parsed = normalise_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database and database != ":memory:" and not database.startswith("file:"):
            path = Path(database).expanduser()
            if not path.is_file():
                raise PersistError(
                    f"no results database at {path}: nothing has been processed with this --workdir / --db yet"
                )
    engine = make_engine(parsed)
    try:
        if current_revision(engine) is None:
            raise PersistError(
                f"the results database {_safe(engine.url)} has no xraybatch tables yet: run `xraybatch db upgrade` "
                "(with the same --db / XRAYBATCH_DB_URL)"
            )
    except BaseException:
        engine.dispose()
        raise
    return engine


def make_engine(url: str | URL) -> Engine:
    """Create an engine for ``url``; nothing connects until first use.

    SQLite: the parent folder is created, and each connection gets WAL journalling, ``foreign_keys=ON`` and a
    30 s busy timeout. ``sqlite://`` (in memory) shares one connection across threads. PostgreSQL: pool
    pre-ping, and a 10 s ``connect_timeout`` unless the URL sets one.

    Raises
    ------
    PersistError
        For an invalid URL, an unknown driver, or a SQLite folder that cannot be created.
    """
    parsed = normalise_url(url)
    kwargs: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database and database != ":memory:" and not database.startswith("file:"):
            folder = Path(database).expanduser().resolve().parent
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise PersistError(
                    f"cannot create the folder {folder} for the SQLite results database ({err.strerror}); "
                    "set workdir or [db] url to a writable place"
                ) from err
        else:
            kwargs.update(poolclass=StaticPool, connect_args={"check_same_thread": False})
    elif parsed.get_backend_name() == "postgresql":
        kwargs["pool_pre_ping"] = True
        if "connect_timeout" not in parsed.query:
            kwargs["connect_args"] = {"connect_timeout": POSTGRES_CONNECT_TIMEOUT_S}
    try:
        engine = sqlalchemy.create_engine(parsed, **kwargs)
    except (ArgumentError, NoSuchModuleError) as err:
        raise PersistError(
            f"cannot use database URL {_safe(parsed)!r} ({err}); xraybatch supports sqlite:/// and postgresql://"
        ) from err
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_connection: Any, connection_record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    finally:
        cursor.close()


class _Session(Session):
    """A session whose close survives a connection that died: the unit of work already failed (``guard`` raised
    PersistError for it), and the rollback that closing runs on the dead connection would otherwise replace that
    error with a raw ``OperationalError``, which no worker treats as a transient fault."""

    def close(self) -> None:
        try:
            super().close()
        except OperationalError as err:  # SQLAlchemy has invalidated the connection; the pool discards it
            logger.debug("closing a session on a lost connection: %s", _first_line(err.orig), extra={"stage": "db"})


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """A session factory for ``engine``; objects stay readable after commit (``expire_on_commit=False``).

    Use one short-lived session per unit of work: ``with factory() as session: repo.claim(session, ...)``.
    """
    return sessionmaker(engine, class_=_Session, expire_on_commit=False)


def check_connection(engine: Engine) -> None:
    """Connect once, so that a wrong URL or a server that is down fails at start-up.

    Raises
    ------
    PersistError
        When the database cannot be reached.
    """
    with _reaching(engine.url), engine.connect():
        pass


def upgrade(url: str | Engine, revision: str = "head") -> None:
    """Apply the Alembic migrations up to ``revision``.

    Parameters
    ----------
    url
        Database URL, or an engine (needed for ``sqlite://`` in memory, which lives in one connection).
    revision
        Target revision; ``"head"`` is the newest.

    Raises
    ------
    PersistError
        When the database cannot be reached or written.
    """
    _run_alembic(url, lambda cfg: command.upgrade(cfg, revision))


def downgrade(url: str | Engine, revision: str) -> None:
    """Revert the Alembic migrations down to ``revision`` (``"base"`` drops every table).

    Raises
    ------
    PersistError
        When the database cannot be reached or written.
    """
    _run_alembic(url, lambda cfg: command.downgrade(cfg, revision))


def current_revision(url: str | Engine) -> str | None:
    """The Alembic revision the database is at; ``None`` for an empty database.

    Raises
    ------
    PersistError
        When the database cannot be reached.
    """
    with _engine(url) as engine, _reaching(engine.url), engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def require_current(url: str | Engine) -> None:
    """Check that the database's schema is the one this version of xraybatch writes.

    Raises
    ------
    PersistError
        When the database has no schema yet or an older one (saying to run ``xraybatch db upgrade``), a newer
        one (from a newer xraybatch), or cannot be reached.
    """
    with _engine(url) as engine:
        current, head = current_revision(engine), head_revision()
        if current == head:
            return
        where = _safe(engine.url)
        if current is None:
            raise PersistError(
                f"the results database {where} has no xraybatch tables yet: run `xraybatch db upgrade` "
                "(with the same --db / XRAYBATCH_DB_URL) or set [db] auto_upgrade = true"
            )
        known = {rev.revision for rev in ScriptDirectory(str(ALEMBIC_DIR)).walk_revisions()}
        if current not in known:
            raise PersistError(
                f"the results database {where} is at schema revision {current}, newer than this xraybatch "
                f"knows (head {head}): upgrade xraybatch"
            )
        raise PersistError(
            f"the results database {where} is at schema revision {current}, this xraybatch needs {head}: run "
            "`xraybatch db upgrade` (with the same --db / XRAYBATCH_DB_URL)"
        )


def head_revision() -> str | None:
    """The newest revision in ``xraybatch/migrations/versions``."""
    return ScriptDirectory(str(ALEMBIC_DIR)).get_current_head()


def _run_alembic(url: str | Engine, run: Callable[[Config], None]) -> None:
    with _engine(url) as engine, _reaching(engine.url), engine.begin() as connection:
        if connection.dialect.name == "postgresql":  # workers starting together migrate one after the other
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        cfg = Config()
        cfg.set_main_option("script_location", str(ALEMBIC_DIR))
        cfg.set_main_option(
            "sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%")
        )
        cfg.attributes["connection"] = connection
        run(cfg)


@contextmanager
def guard(session: Session, what: str) -> Iterator[None]:
    """Roll ``session`` back on any error so it stays usable; an unreachable database becomes PersistError.

    Parameters
    ----------
    session
        The session the block uses.
    what
        What the block does, for the message: ``"claim the instance"``.

    Raises
    ------
    PersistError
        For ``sqlalchemy.exc.OperationalError`` (server down, connection lost, SQLite locked or missing
        tables); other errors pass through unchanged.
    """
    try:
        yield
    except OperationalError as err:
        session.rollback()
        raise PersistError(
            f"could not {what} in the results database: {_first_line(err.orig)}; {FIX_HINT}"
        ) from err
    except BaseException:
        session.rollback()
        raise


@contextmanager
def _engine(url: str | Engine) -> Iterator[Engine]:
    """Yield ``url`` as an engine; one made here is disposed of afterwards."""
    if isinstance(url, Engine):
        yield url
        return
    engine = make_engine(url)
    try:
        yield engine
    finally:
        engine.dispose()


@contextmanager
def _reaching(url: URL) -> Iterator[None]:
    """Turn a failure to reach the database into a PersistError that says how to fix it."""
    try:
        yield
    except OperationalError as err:
        raise PersistError(
            f"cannot use the results database {_safe(url)}: {_first_line(err.orig)}; {FIX_HINT}"
        ) from err


def _safe(url: URL) -> str:
    """``url`` with any password masked, for messages."""
    return url.render_as_string(hide_password=True)


def _first_line(err: BaseException | None) -> str:
    return str(err).strip().splitlines()[0] if err is not None and str(err).strip() else "no detail"
