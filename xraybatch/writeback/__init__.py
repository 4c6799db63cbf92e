"""Write-back: the DICOM outputs that go back into the source's study.

:func:`write_outputs` builds, as ``[output]`` asks, a Secondary Capture (:mod:`.sc`), one Parametric Map per
explained finding (:mod:`.pm`) and a TID 1500 Structured Report (:mod:`.sr`) that references them, and writes
each atomically to ``outbox/<StudyUID>/<SeriesUID>/<SOPUID>.dcm`` (valid UIDs only, inside the outbox). All are
labelled "AI generated - not for diagnostic use". Their UIDs are derived from the source and the model set, so
re-processing rewrites rather than duplicates.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import pydicom

from xraybatch.domain import DisplayImage, Heatmap, OutputRecord, Prediction
from xraybatch.errors import WriteBackError
from xraybatch.logs import mask_exception_text
from xraybatch.settings import OutputConfig
from xraybatch.writeback.common import atomic_write, output_path
from xraybatch.writeback.pm import build_pm
from xraybatch.writeback.sc import build_sc
from xraybatch.writeback.sr import build_sr

logger = logging.getLogger(__name__)

__all__ = ["build_pm", "build_sc", "build_sr", "write_outputs"]

_FLAGS = {"sc": "secondary_capture", "pm": "parametric_map", "sr": "structured_report"}


def write_outputs(
    source: pydicom.Dataset,
    display: DisplayImage,
    predictions: Sequence[Prediction],
    heatmaps: Sequence[Heatmap],
    cfg: OutputConfig,
    outbox: Path,
) -> tuple[OutputRecord, ...]:
    """Build and write the Secondary Capture, the Parametric Maps and the Structured Report of one image.

    Every object is built before the first is written, so a build error writes nothing.

    Parameters
    ----------
    source
        The source image dataset without Pixel Data.
    display
        The source image for display, at the source geometry.
    predictions
        One prediction per model.
    heatmaps
        Heat maps of the explained findings; may be empty.
    cfg
        ``[output]``: which objects to write, their sizes and encoding, the institution, the UID root.
    outbox
        The outbox folder.

    Returns
    -------
    tuple of OutputRecord
        One record per object written: the SC (kind ``"sc"``), the maps (``"pm"``), then the SR (``"sr"``).

    Raises
    ------
    WriteBackError
        An object could not be built from the source, or could not be written.
    InvalidInputError
        The source's Study Instance UID cannot name a folder inside the outbox (not a valid UID).
    """
    built: list[tuple[str, pydicom.Dataset]] = []

    def build(kind: str, make: Callable[[], pydicom.Dataset]) -> pydicom.Dataset:
        try:
            with warnings.catch_warnings():
                # highdicom quotes the patient's and physicians' names in this warning: keep them out of logs.
                warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
                ds = make()
        except (ValueError, TypeError, AttributeError) as err:
            raise WriteBackError(
                f"could not build the {kind.upper()} for SOP Instance {source.get('SOPInstanceUID', '?')}: "
                f"{mask_exception_text(str(err))}; fix the cause, or set [output] {_FLAGS[kind]} = false to skip this object"
            ) from err
        built.append((kind, ds))
        return ds

    if cfg.secondary_capture:
        build("sc", lambda: build_sc(source, display, predictions, heatmaps, cfg))
    if cfg.parametric_map:
        for heatmap in heatmaps:
            build("pm", lambda h=heatmap: build_pm(source, h, predictions, cfg))  # type: ignore[misc]
    if cfg.structured_report:
        references = [ds for _, ds in built]
        build("sr", lambda: build_sr(source, predictions, cfg, references))
    paths = [(kind, ds, output_path(outbox, ds)) for kind, ds in built]
    records = []
    for kind, ds, path in paths:
        atomic_write(ds, path)
        records.append(OutputRecord(kind, str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), path))
        logger.info(
            "wrote %s %s",
            kind.upper(),
            path.name,
            extra={"sop_instance_uid": str(source.get("SOPInstanceUID", "")), "stage": "writeback"},
        )
    return tuple(records)
