"""STOW-RS delivery to a DICOMweb base URL with dicomweb-client (PS3.18 10.5), optionally read back by QIDO-RS.

One POST to ``{base}/studies`` per batch. An object is ``sent`` only when the response's Referenced SOP
Sequence lists it and its Failed SOP Sequence does not (PS3.18 10.5.3); listed as failed it is ``failed`` with
the Failure Reason (0008,1197). No answer, a 5xx,
401/403 (credentials) or 404 (wrong base URL) leave the whole batch ``pending``: the destination, not the
object, is the problem. With ``[delivery] verify = "qido"`` each sent object is looked up again by QIDO-RS and
the result stored (``found`` / ``not_found``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset

from xraybatch.delivery.common import FAILED, SENT, BatchResult, Item, ItemResult, pending_all
from xraybatch.delivery.destinations import Destination

if TYPE_CHECKING:
    from xraybatch.settings import DeliveryConfig

logger = logging.getLogger(__name__)

_DESTINATION_FAULTS = {401: "credentials refused", 403: "access refused", 404: "no STOW-RS service at this URL"}


def make_client(dest: Destination, cfg: DeliveryConfig, connect_timeout: float, hook: Any = None) -> DICOMwebClient:
    """A dicomweb-client for ``dest`` with our auth, TLS files and timeouts, and no retries of its own."""
    session = requests.Session()
    if cfg.http_token:
        session.headers["Authorization"] = f"Bearer {cfg.http_token}"
    elif cfg.http_username:
        session.auth = (cfg.http_username, cfg.http_password)
    if cfg.tls_ca_file:
        session.verify = cfg.tls_ca_file
    if cfg.tls_cert_file:
        session.cert = (cfg.tls_cert_file, cfg.tls_key_file)
    client = DICOMwebClient(
        dest.base_url, session=session, timeout=(connect_timeout, cfg.timeout), callback=hook,
    )
    client.set_http_retry_params(retry=False)  # retries are ours: counted, backed off, never blind
    return client


def send_stow(dest: Destination, items: Sequence[Item], cfg: DeliveryConfig, connect_timeout: float) -> BatchResult:
    """POST ``items`` to ``{dest}/studies`` in one request; one :class:`ItemResult` per item, in order."""
    results: dict[int, ItemResult] = {}
    datasets: list[tuple[Item, Dataset]] = []
    for item in items:
        try:
            datasets.append((item, pydicom.dcmread(item.path)))
        except (OSError, pydicom.errors.InvalidDicomError) as err:
            results[item.delivery_id] = ItemResult(
                item.delivery_id, FAILED, None, f"the output file cannot be read ({type(err).__name__}: {err}); "
                "it was removed from the outbox or damaged: process the source again",
            )
    if not datasets:
        return BatchResult(tuple(results[i.delivery_id] for i in items))

    answered: list[int] = []

    def hook(response: requests.Response, *args: Any, **kwargs: Any) -> requests.Response:
        answered.append(response.status_code)
        return response

    client = make_client(dest, cfg, connect_timeout, hook)
    http: int | None = None
    try:
        reply = client.store_instances([ds for _, ds in datasets])
        http = answered[-1] if answered else 200
    except requests.HTTPError as err:
        response = err.response
        http = response.status_code if response is not None else None
        if http is None or http >= 500 or http in _DESTINATION_FAULTS:
            what = _DESTINATION_FAULTS.get(http or 0, "server error")
            return pending_all(list(items), f"{dest}: HTTP {http} ({what})")
        reply = _reply_dataset(response) if response is not None else Dataset()
    except (requests.ConnectionError, requests.Timeout) as err:
        return pending_all(list(items), f"{dest}: not reachable ({type(err).__name__})")
    except ValueError as err:  # a response dicomweb-client cannot read
        return pending_all(list(items), f"{dest}: unreadable STOW-RS response ({err})")

    stored = {str(r.ReferencedSOPInstanceUID): r for r in reply.get("ReferencedSOPSequence", [])}
    failed = {str(r.ReferencedSOPInstanceUID): r for r in reply.get("FailedSOPSequence", [])}
    for item, _ in datasets:
        uid = item.sop_instance_uid
        extra = {"sop_instance_uid": uid, "stage": "deliver", "destination": str(dest)}
        if uid in failed:
            code = failed[uid].get("FailureReason")
            reason = f"FailureReason 0x{int(code):04X}" if code is not None else "listed in FailedSOPSequence"
            text = f"HTTP {http}: {dest} refused the object ({reason})"
            logger.warning("%s", text, extra=extra)
            results[item.delivery_id] = ItemResult(item.delivery_id, FAILED, http, text)
        elif uid in stored:
            warning = stored[uid].get("WarningReason")
            text = f"WarningReason 0x{int(warning):04X}" if warning is not None else ""
            if warning is not None:
                logger.warning("%s stored the object with a warning: %s", dest, text, extra=extra)
            results[item.delivery_id] = ItemResult(item.delivery_id, SENT, http, text, warning=warning is not None)
        else:
            text = f"HTTP {http}: the STOW-RS response does not list this object as stored"
            logger.warning("%s", text, extra=extra)
            results[item.delivery_id] = ItemResult(item.delivery_id, FAILED, http, text)
    if cfg.verify == "qido":
        _read_back(client, datasets, results, dest)
    return BatchResult(tuple(results[i.delivery_id] for i in items))


def _reply_dataset(response: requests.Response) -> Dataset:
    """The STOW-RS response body of an error answer (409 and the like), or an empty Dataset."""
    if not response.content:
        return Dataset()
    try:
        return Dataset.from_json(response.json())
    except ValueError:
        return Dataset()


def _read_back(client: DICOMwebClient, datasets: list[tuple[Item, Dataset]], results: dict[int, ItemResult],
               dest: Destination) -> None:
    """QIDO-RS: is each sent object found in its study? Stores ``found`` or ``not_found`` on the result."""
    by_study: dict[str, list[Item]] = {}
    for item, _ in datasets:
        if results[item.delivery_id].state == SENT:
            by_study.setdefault(item.study_instance_uid, []).append(item)
    for study, study_items in by_study.items():
        try:
            found = {
                str(entry.get("00080018", {}).get("Value", [""])[0])
                for entry in client.search_for_instances(study_instance_uid=study, fields=["SOPInstanceUID"],
                                                         get_remaining=True)
            }
        except (requests.RequestException, ValueError) as err:
            logger.warning("%s: QIDO-RS read-back failed (%s); the objects stay sent, unverified", dest, err,
                           extra={"stage": "deliver", "destination": str(dest)})
            continue
        for item in study_items:
            old = results[item.delivery_id]
            verdict = "found" if item.sop_instance_uid in found else "not_found"
            results[item.delivery_id] = ItemResult(old.delivery_id, old.state, old.status, old.reason, verdict,
                                                   old.warning)
