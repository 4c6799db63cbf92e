"""Delivery of the outputs to PACS nodes: DIMSE C-STORE and DICOMweb STOW-RS, verified and exactly once.

Each output has one ``deliveries`` row per destination (``pending``, ``sent`` or ``failed``). Processing only
writes outputs; delivery is its own stage that never holds processing up:

- :func:`deliver_pending`: one pass over what is pending (``xraybatch deliver``, the end of ``run-folder``).
- :class:`DeliveryWorker`: the background thread of ``xraybatch watch``.

Destinations are URLs (:mod:`.destinations`): ``dicom://CALLED_AE@HOST:PORT``, ``dicoms://...`` and
``http(s)://HOST:PORT/PATH``. See docs/delivery.md.
"""

from __future__ import annotations

from xraybatch.delivery.common import FAILED, PENDING, SENT, ItemResult
from xraybatch.delivery.destinations import Destination, parse_destination, parse_destinations
from xraybatch.delivery.service import DeliveryReport, DeliveryWorker, deliver_pending, start_background

__all__ = [
    "FAILED",
    "PENDING",
    "SENT",
    "DeliveryReport",
    "DeliveryWorker",
    "Destination",
    "ItemResult",
    "deliver_pending",
    "parse_destination",
    "parse_destinations",
    "start_background",
]
