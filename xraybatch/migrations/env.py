"""Alembic environment for the xraybatch results database.

The database URL comes from, in order: the Config's ``sqlalchemy.url`` (set in code by
:func:`xraybatch.db.session.upgrade`), ``alembic -x url=...``, then ``XRAYBATCH_DB_URL``. When xraybatch runs
migrations it also passes its open connection in ``config.attributes["connection"]``. Logging is configured from
``alembic.ini`` only when Alembic runs from the command line, never when xraybatch calls it.
"""

from __future__ import annotations

import logging
import os
from logging.config import fileConfig
from typing import Any, Literal

from alembic import context
from alembic.autogenerate.api import AutogenContext
from sqlalchemy.engine import Connection

from xraybatch.db.session import make_engine, normalise_url
from xraybatch.db.tables import Base, UTCDateTime

logger = logging.getLogger("alembic.env")

config = context.config
if config.config_file_name is not None:  # the alembic command line, not xraybatch
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def _url() -> str:
    url = (
        config.get_main_option("sqlalchemy.url")
        or context.get_x_argument(as_dictionary=True).get("url")
        or os.environ.get("XRAYBATCH_DB_URL")
    )
    if not url:
        raise SystemExit(
            "no database URL: pass -x url=sqlite:///PATH (or postgresql://USER@HOST/DB) or set XRAYBATCH_DB_URL"
        )
    return normalise_url(url).render_as_string(hide_password=False)


def _render_item(type_: str, obj: Any, autogen_context: AutogenContext) -> str | Literal[False]:
    """Autogenerate plain ``sa.DateTime(timezone=True)`` for our UTC type, so migrations never import xraybatch."""
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def _configure(**kwargs: Any) -> None:
    context.configure(target_metadata=target_metadata, render_item=_render_item, compare_type=True, **kwargs)


def run_migrations_offline() -> None:
    """Emit the SQL to stdout (``alembic upgrade head --sql``)."""
    url = _url()
    _configure(url=url, literal_binds=True, render_as_batch=url.startswith("sqlite"))
    with context.begin_transaction():
        context.run_migrations()


def _run_on(connection: Connection) -> None:
    _configure(connection=connection, render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run the migrations on xraybatch's connection, or on one opened here."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _run_on(connection)
        return
    engine = make_engine(_url())
    try:
        with engine.connect() as connection:
            _run_on(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
