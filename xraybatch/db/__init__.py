"""The results database: schema (:mod:`.tables`), engines and migrations (:mod:`.session`), queries
(:mod:`.repo`) and exports (:mod:`.export`). ``docs/results-db.md`` documents the schema for users.
"""

from __future__ import annotations

from xraybatch.db.session import (
    check_connection,
    current_revision,
    downgrade,
    head_revision,
    make_engine,
    make_sessionmaker,
    upgrade,
)

__all__ = [
    "check_connection",
    "current_revision",
    "downgrade",
    "head_revision",
    "make_engine",
    "make_sessionmaker",
    "upgrade",
]
