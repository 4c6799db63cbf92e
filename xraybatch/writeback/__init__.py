"""Write-back: the DICOM outputs that go back into the source's study.

:func:`write_outputs` builds a Secondary Capture (:mod:`.sc`) and a TID 1500 Structured Report (:mod:`.sr`),
as ``[output]`` asks, and writes each atomically to ``outbox/<StudyUID>/<SeriesUID>/<SOPUID>.dcm``. Both are
labelled "AI generated - not for diagnostic use". Their UIDs are derived from the source and the model set,
so a re-run overwrites rather than duplicates.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import pydicom

from xraybatch.domain import DisplayImage, Heatmap, OutputRecord, Prediction
from xraybatch.errors import WriteBackError
from xraybatch.settings import OutputConfig
from xraybatch.writeback.common import atomic_write, output_path
from xraybatch.writeback.sc import build_sc
from xraybatch.writeback.sr import build_sr

logger = logging.getLogger(__name__)

__all__ = ["build_sc", "build_sr", "write_outputs"]

_FLAGS = {"sc": "secondary_capture", "sr": "structured_report"}


def write_outputs(
    source: pydicom.Dataset,
    display: DisplayImage,
    predictions: Sequence[Prediction],
    heatmaps: Sequence[Heatmap],
    cfg: OutputConfig,
    outbox: Path,
) -> tuple[OutputRecord, ...]:
    """Build and write the Secondary Capture and the Structured Report of one source image.

    Parameters
    ----------
    source
        The source image dataset without Pixel Data.
    display
        The source image for display, at the source geometry.
    predictions
        One prediction per model.
    heatmaps
        Heat maps of the positive findings; may be empty.
    cfg
        ``[output]``: which objects to write, the SC size, the institution.
    outbox
        The outbox folder.

    Returns
    -------
    tuple of OutputRecord
        One record per object written, SC first.

    Raises
    ------
    WriteBackError
        An object could not be built from the source or could not be written.
    """
    builders: list[tuple[str, Callable[[], pydicom.Dataset]]] = []
    if cfg.secondary_capture:
        builders.append(("sc", lambda: build_sc(source, display, predictions, heatmaps, cfg)))
    if cfg.structured_report:
        builders.append(("sr", lambda: build_sr(source, predictions, cfg)))
    records = []
    for kind, build in builders:
        try:
            with warnings.catch_warnings():
                # highdicom quotes the patient's and physicians' names in this warning: keep them out of logs.
                warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
                ds = build()
        except (ValueError, TypeError, AttributeError) as err:
            raise WriteBackError(
                f"could not build the {kind.upper()} for SOP Instance {source.get('SOPInstanceUID', '?')}: {err}; "
                f"fix the cause, or set [output] {_FLAGS[kind]} = false to skip this object"
            ) from err
        path = output_path(outbox, ds)
        atomic_write(ds, path)
        records.append(OutputRecord(kind, str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), path))
        logger.info(
            "wrote %s %s",
            kind.upper(),
            path.name,
            extra={"sop_instance_uid": str(source.get("SOPInstanceUID", "")), "stage": "writeback"},
        )
    return tuple(records)
