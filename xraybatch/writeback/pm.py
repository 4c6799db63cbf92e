"""The Parametric Map: one per explained finding, the Grad-CAM heat as real-world values in [0, 1].

A viewer can overlay, toggle and window a parametric map (IHE AI Results prefers it to a burned-in capture).
The map is stored on a coarse grid, ``[output] pm_max_size`` on its longest side, with the pixel spacing
scaled so that it covers exactly the source image: Grad-CAM is computed on a grid of a few dozen cells, so a
finer map holds no more information. Stored values are 16-bit integers 0-1000, JPEG-LS lossless; the Real
World Value Mapping (slope 0.001, UCUM "1") turns them into the heat in [0, 1].

The Parametric Map IOD needs a Frame of Reference and plane geometry. A source that has them (Frame of
Reference UID, Image Orientation and Position (Patient), Pixel Spacing) shares them with its map. A projection
radiograph (CR, DX) usually has none: its map then gets a Frame of Reference of its own, derived from the
source's SOP Instance UID, with the image plane at the origin oriented by the source's Patient Orientation and
spaced by its Pixel Spacing or Imager Pixel Spacing (1 mm per source pixel when neither holds a usable value;
the Content Description says so). The map references the source image (Derivation Image Sequence and Referenced
Series), so the pixel-to-pixel correspondence is exact either way.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import cv2
import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import JPEGLSLossless

from xraybatch.domain import Heatmap, Prediction, fit_within
from xraybatch.models.findings import label
from xraybatch.settings import OutputConfig
from xraybatch.writeback.common import (
    MANUFACTURER,
    SERIES_DESCRIPTION,
    contributing_equipment,
    copy_series_context,
    derive_uid,
    device_serial_number,
    instance_number,
    keep_identity,
    output_uids,
    set_equipment,
    software_versions,
    usable_source,
)

logger = logging.getLogger(__name__)

SERIES_NUMBER = 9903
STORED_MAX = 1000  # stored value of heat 1.0
_DIRECTIONS = {
    "L": (1.0, 0.0, 0.0),
    "R": (-1.0, 0.0, 0.0),
    "P": (0.0, 1.0, 0.0),
    "A": (0.0, -1.0, 0.0),
    "H": (0.0, 0.0, 1.0),
    "F": (0.0, 0.0, -1.0),
}


def map_key(heatmap: Heatmap) -> str:
    """What names one map among the maps of one source: ``model/target``."""
    return f"{heatmap.model_name}/{heatmap.target}"


def build_pm(
    source: Dataset, heatmap: Heatmap, predictions: Sequence[Prediction], cfg: OutputConfig
) -> Dataset:
    """Build the Parametric Map (PS3.3 A.75) of one heat map.

    Parameters
    ----------
    source
        The source image dataset without Pixel Data.
    heatmap
        The heat map, in [0, 1], covering the source image (on its grid or a coarser one).
    predictions
        One prediction per model (they name the series and the equipment).
    cfg
        The output settings (``pm_max_size``, ``institution``, ``uid_root``).

    Returns
    -------
    pydicom.Dataset
        A ``highdicom.pm.ParametricMap`` in the parametric-map series of the source's study.

    Raises
    ------
    ValueError
        The heat map does not cover an image of the source's shape.
    """
    original = source
    source = usable_source(source)
    rows, cols = int(source.Rows), int(source.Columns)
    if heatmap.covers != (rows, cols):
        raise ValueError(f"heat map {map_key(heatmap)} covers an image of {heatmap.covers}, expected {(rows, cols)}")
    key = map_key(heatmap)
    uids = output_uids(source, "pm", predictions, cfg.uid_root, item=key)
    grid = fit_within((rows, cols), cfg.pm_max_size)
    heat = heatmap.values.astype(np.float32)
    shrinking = grid[0] * grid[1] < heat.size
    values = cv2.resize(heat, (grid[1], grid[0]), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    stored = np.round(np.clip(values, 0.0, 1.0) * STORED_MAX).astype(np.uint16)

    geometry, nominal = _geometry(source, cfg.uid_root)
    row_dir = np.asarray(geometry.ImageOrientationPatient[:3], float)
    col_dir = np.asarray(geometry.ImageOrientationPatient[3:], float)
    spacing = (float(geometry.PixelSpacing[0]), float(geometry.PixelSpacing[1]))  # between rows, between columns
    step = (rows / grid[0], cols / grid[1])  # source pixels per map pixel, down and across
    origin = np.asarray(geometry.ImagePositionPatient, float)
    # centre of map pixel (0, 0) in source pixel units is ((step - 1) / 2) down and across from source (0, 0)
    first = origin + col_dir * (step[0] - 1) / 2 * spacing[0] + row_dir * (step[1] - 1) / 2 * spacing[1]

    name = label(heatmap.target)
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="GRADCAM",
        lut_explanation=f"Grad-CAM heat of {name} ({heatmap.model_name})"[:64],
        unit=codes.UCUM.NoUnits,
        value_range=(0, STORED_MAX),
        slope=1.0 / STORED_MAX,
        intercept=0.0,
    )
    description = f"Grad-CAM {name} p={heatmap.probability:.2f}" + (", spacing nominal" if nominal else "")
    pm = hd.pm.ParametricMap(
        source_images=[geometry],
        pixel_array=stored,
        series_instance_uid=uids.series_instance_uid,
        series_number=SERIES_NUMBER,
        sop_instance_uid=uids.sop_instance_uid,
        instance_number=instance_number(source, "pm", key),
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MANUFACTURER,
        software_versions=software_versions(predictions),  # type: ignore[arg-type]  # VM 1-n: a list
        device_serial_number=device_serial_number(predictions),
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=STORED_MAX / 2, window_width=STORED_MAX)],
        transfer_syntax_uid=JPEGLSLossless,
        content_description=description[:64],
        content_label="GRADCAM",
        # not a pixel-arithmetic derivation of the source (and dciodvfy does not know highdicom's QUANTITY)
        derived_pixel_contrast="NONE",
        pixel_measures=hd.PixelMeasuresSequence(
            pixel_spacing=(spacing[0] * step[0], spacing[1] * step[1]), slice_thickness=None
        ),
        plane_orientation=hd.PlaneOrientationSequence(
            coordinate_system="PATIENT", image_orientation=tuple(map(float, [*row_dir, *col_dir]))
        ),
        plane_positions=[hd.PlanePositionSequence(coordinate_system="PATIENT", image_position=tuple(first))],
        contributing_equipment=contributing_equipment(source, predictions, cfg.institution, cfg.uid_root),
        series_description=SERIES_DESCRIPTION,
    )
    keep_identity(pm, original)
    copy_series_context(pm, source)
    set_equipment(pm, predictions, cfg.uid_root)
    return pm


def _geometry(source: Dataset, root: str) -> tuple[Dataset, bool]:
    """The source with the plane geometry highdicom needs, and whether its pixel spacing is nominal.

    A shallow copy: a source with a Frame of Reference, orientation, position and spacing keeps them;
    otherwise the copy gets a derived Frame of Reference and a plane at the origin (see the module docstring).
    """
    geometry = Dataset({elem.tag: elem for elem in source})
    if "SliceThickness" not in geometry:
        geometry.SliceThickness = None  # highdicom reads it; a projection image has none
    if all(k in source for k in ("FrameOfReferenceUID", "ImageOrientationPatient", "ImagePositionPatient")) and (
        _spacing(source.get("PixelSpacing")) is not None
    ):
        return geometry, False
    geometry.FrameOfReferenceUID = derive_uid(root, "frame-of-reference", str(source.SOPInstanceUID))
    orientation = [str(v) for v in source.get("PatientOrientation") or ()]
    if len(orientation) == 2 and all(v in _DIRECTIONS for v in orientation):
        row_dir, col_dir = _DIRECTIONS[orientation[0]], _DIRECTIONS[orientation[1]]
    else:
        row_dir, col_dir = _DIRECTIONS["L"], _DIRECTIONS["F"]  # a frontal chest image as usually displayed
    geometry.ImageOrientationPatient = [*row_dir, *col_dir]
    geometry.ImagePositionPatient = [0.0, 0.0, 0.0]
    spacing = _spacing(source.get("PixelSpacing")) or _spacing(source.get("ImagerPixelSpacing"))
    geometry.PixelSpacing = list(spacing or (1.0, 1.0))
    return geometry, spacing is None


def _spacing(value: object) -> tuple[float, float] | None:
    """Two positive spacings, or None for a missing, zero or malformed value."""
    try:
        pair = tuple(float(v) for v in value)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        return None
    if len(pair) != 2 or not all(v > 0 for v in pair):
        return None
    return pair[0], pair[1]
