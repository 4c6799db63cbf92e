"""What a sender is given and what it answers: shared by the C-STORE and STOW-RS senders."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from xraybatch.settings import DeliveryConfig

SENT, FAILED, PENDING = "sent", "failed", "pending"


@dataclass(frozen=True)
class Item:
    """One output to send to one destination (a ``deliveries`` row)."""

    delivery_id: int
    sop_instance_uid: str
    study_instance_uid: str
    path: Path


@dataclass(frozen=True)
class ItemResult:
    """What the destination answered for one item.

    ``state``: ``sent`` (success or warning), ``failed`` (the destination refused it: ``reason`` says why), or
    ``pending`` (no definite answer: connection lost, destination out of resources; to be sent again).
    """

    delivery_id: int
    state: str
    status: int | None  # DIMSE status or HTTP status
    reason: str = ""
    verified: str = ""  # "committed", "not_committed", "found", "not_found", or "" when not verified
    warning: bool = False  # sent with a warning status


@dataclass(frozen=True)
class BatchResult:
    """The answers for one batch; ``fault`` is set when the destination could not be reached at all."""

    results: tuple[ItemResult, ...]
    fault: str = ""


def tls_context(cfg: DeliveryConfig) -> ssl.SSLContext:
    """The client TLS context of ``dicoms://`` and ``https://``: CA bundle and optional client certificate."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cfg.tls_ca_file or None)
    if cfg.tls_cert_file:
        context.load_cert_chain(cfg.tls_cert_file, cfg.tls_key_file or None)
    return context


def pending_all(items: list[Item] | tuple[Item, ...], reason: str) -> BatchResult:
    """Every item of a batch left pending because the destination was unreachable."""
    return BatchResult(tuple(ItemResult(i.delivery_id, PENDING, None, reason) for i in items), fault=reason)
