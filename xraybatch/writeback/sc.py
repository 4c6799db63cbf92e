"""The Secondary Capture: the whole radiograph, the heat map of each explained finding in its own colour, and
every model's result in a side panel.

Nothing is drawn over the anatomy except the heat: the banner "AI GENERATED - NOT FOR DIAGNOSTIC USE" runs in a
band added above the image, and the findings panel (each model, each target with probability, threshold and
result, negatives included; a colour swatch for each explained finding) stands to the right of it. Each heat map
fades in smoothly above :data:`HEAT_LOW` and is outlined at :data:`HEAT_CONTOUR`, in its finding's colour. The
image part is ``[output] sc_max_size`` on its longest side. Burned In Annotation is ``YES``; Conversion Type is
WSD. The pixels are encoded as ``[output] sc_encoding`` (JPEG baseline by default; docs/outputs.md compares).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import cv2
import highdicom as hd
import numpy as np
from highdicom.enum import PatientOrientationValuesBiped
from pydicom import Dataset
from pydicom.uid import UID, JPEGBaseline8Bit, JPEGLSLossless, RLELossless

from xraybatch.domain import DisplayImage, Heatmap, Prediction, fit_within
from xraybatch.models.findings import label
from xraybatch.settings import OutputConfig
from xraybatch.writeback.common import (
    BANNER,
    MANUFACTURER,
    SERIES_DESCRIPTION,
    contributing_equipment,
    copy_series_context,
    instance_number,
    keep_identity,
    model_set,
    output_uids,
    set_equipment,
    software_versions,
    usable_source,
)
from xraybatch.writeback.sr import disagreements

logger = logging.getLogger(__name__)

SERIES_NUMBER = 9901
HEAT_LOW = 0.3  # heat fades in from here ...
HEAT_HIGH = 0.8  # ... to full opacity here
HEAT_ALPHA = 0.5  # opacity of the heat colour at full heat
HEAT_CONTOUR = 0.6  # each heat map is outlined at this level
_BLUR_SIDE = 256  # longest side of the grid the heat is blurred on before it is upsampled onto the image
# Okabe-Ito colours: told apart by colour-blind readers and distinct from the grey image
COLOURS: tuple[tuple[int, int, int], ...] = (
    (230, 159, 0),  # orange
    (86, 180, 233),  # sky blue
    (204, 121, 167),  # reddish purple
    (0, 158, 115),  # bluish green
    (213, 94, 0),  # vermillion
    (240, 228, 66),  # yellow
)
ENCODINGS: dict[str, UID | None] = {
    "jpeg": JPEGBaseline8Bit,
    "jpeg-ls": JPEGLSLossless,
    "rle": RLELossless,
    "none": None,
}
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_YELLOW = (255, 220, 0)
_WHITE = (255, 255, 255)
_GREY = (165, 165, 165)
_PANEL = (24, 24, 24)


def build_sc(
    source: Dataset,
    display: DisplayImage,
    predictions: Sequence[Prediction],
    heatmaps: Sequence[Heatmap],
    cfg: OutputConfig,
) -> Dataset:
    """Build the Secondary Capture Image (PS3.3 A.8.1) for one source image.

    Parameters
    ----------
    source
        The source image dataset without Pixel Data; patient and study attributes are copied from it.
    display
        The source image for display, at the source geometry.
    predictions
        One prediction per model.
    heatmaps
        Heat maps of the explained findings, at the source geometry; may be empty.
    cfg
        The output settings (``sc_max_size``, ``sc_encoding``, ``institution``, ``uid_root``).

    Returns
    -------
    pydicom.Dataset
        A ``highdicom.sc.SCImage`` in a new series of the source's study.

    Raises
    ------
    ValueError
        A heat map does not cover an image of the display image's shape.
    """
    original = source
    source = usable_source(source)
    uids = output_uids(source, "sc", predictions, cfg.uid_root)
    pixels = render(display, predictions, heatmaps, cfg.sc_max_size)
    orientation = _orientation(source)
    syntax = ENCODINGS[cfg.sc_encoding]
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=pixels,
        photometric_interpretation="YBR_FULL_422" if syntax == JPEGBaseline8Bit else "RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=uids.series_instance_uid,
        series_number=SERIES_NUMBER,
        sop_instance_uid=uids.sop_instance_uid,
        instance_number=instance_number(source, "sc"),
        manufacturer=MANUFACTURER,
        # margins and resizing keep the directions; highdicom insists on a value, emptied below if unknown
        patient_orientation=orientation or ("L", "F"),
        contributing_equipment=contributing_equipment(source, predictions, cfg.institution, cfg.uid_root),
        series_description=SERIES_DESCRIPTION,
        manufacturer_model_name=MANUFACTURER,
        software_versions=software_versions(predictions),
        institution_name=cfg.institution or source.get("InstitutionName") or None,
        transfer_syntax_uid=syntax or "1.2.840.10008.1.2.1",
    )
    if orientation is None:
        sc.PatientOrientation = []  # General Image Type 2C: empty when unknown
    keep_identity(sc, original)
    copy_series_context(sc, source)
    for keyword in ("SeriesDate", "SeriesTime"):
        if source.get(keyword):
            setattr(sc, keyword, source.get(keyword))
    sc.ConversionType = "WSD"  # workstation: a rendering of another image
    sc.BurnedInAnnotation = "YES"
    sc.DerivationDescription = f"Grad-CAM overlay by {model_set(predictions)}; {SERIES_DESCRIPTION}"
    if syntax == JPEGBaseline8Bit:
        raw = pixels.size
        sc.LossyImageCompression = "01"
        sc.LossyImageCompressionMethod = "ISO_10918_1"
        sc.LossyImageCompressionRatio = f"{raw / max(1, len(_frame_bytes(sc))):.2f}"[:16]
    elif source.get("LossyImageCompression") == "01":
        sc.LossyImageCompression = "01"
    ref = Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = [ref]
    set_equipment(sc, predictions, cfg.uid_root)
    return sc


def render(
    display: DisplayImage, predictions: Sequence[Prediction], heatmaps: Sequence[Heatmap], max_size: int
) -> np.ndarray:
    """Draw the Secondary Capture pixels: banner band, image with heat, findings panel.

    Parameters
    ----------
    display
        The source image for display.
    predictions
        One prediction per model; all their results are listed.
    heatmaps
        Heat maps of the explained findings, drawn in :data:`COLOURS` order.
    max_size
        Longest side of the image part in pixels.

    Returns
    -------
    numpy.ndarray
        uint8 RGB, shape (rows, columns, 3): the banner band on top, the image (longest side ``max_size``,
        aspect ratio kept) below it on the left, the panel on its right.

    Raises
    ------
    ValueError
        A heat map does not cover an image of the display image's shape.
    """
    rows, cols = display.pixels.shape
    for h in heatmaps:
        if h.covers != (rows, cols):
            raise ValueError(
                f"heat map {h.model_name}/{h.target} covers an image of {h.covers}, expected {(rows, cols)}"
            )
    scale = max_size / max(rows, cols)
    size = (max(1, round(cols * scale)), max(1, round(rows * scale)))  # cv2 wants (width, height)
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    gray = cv2.resize(display.pixels, size, interpolation=interpolation)
    gray8 = (np.clip(gray, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    image = cv2.cvtColor(gray8, cv2.COLOR_GRAY2RGB)
    colours = {(h.model_name, h.target): COLOURS[i % len(COLOURS)] for i, h in enumerate(heatmaps)}
    for h in heatmaps:
        _blend_heat(image, h, size, colours[(h.model_name, h.target)])
    lines = panel_lines(predictions, colours)
    unit = max(14, round(0.03 * max(size)))  # line height of the panel text
    unit = min(unit, max(14, size[1] // (len(lines) + 2)))
    panel = _panel(lines, unit, size[1])
    body = np.concatenate([image, panel], axis=1)
    return np.concatenate([_banner(body.shape[1], unit), body], axis=0)


class PanelLine:
    """One line of the findings panel."""

    def __init__(
        self,
        cells: Sequence[str],
        colour: tuple[int, int, int] = _GREY,
        swatch: tuple[int, int, int] | None = None,
    ) -> None:
        self.cells = tuple(cells)
        self.colour = colour
        self.swatch = swatch


def panel_lines(
    predictions: Sequence[Prediction], colours: dict[tuple[str, str], tuple[int, int, int]] | None = None
) -> list[PanelLine]:
    """The panel: per model a heading and one line per target (finding, probability, threshold, result).

    Parameters
    ----------
    predictions
        One prediction per model; every target is listed, negative ones included.
    colours
        The overlay colour of each explained (model, target); they get a swatch.

    Returns
    -------
    list of PanelLine
        Positive results in white, negative ones in grey; a disagreement between models ends the list.
    """
    colours = colours or {}
    lines = [PanelLine(["Finding", "p", "thr", "result"], _WHITE)]
    for p in predictions:
        lines.append(PanelLine([f"{p.model_name} {p.model_version}"], _YELLOW))
        for target, prob, thr, pos in zip(p.targets, p.probabilities, p.thresholds, p.positive):
            lines.append(
                PanelLine(
                    [label(target), f"{prob:.2f}", f"{thr:.2f}", "POSITIVE" if pos else "negative"],
                    _WHITE if pos else _GREY,
                    colours.get((p.model_name, target)),
                )
            )
    for sentence in disagreements(predictions):
        lines.append(PanelLine([sentence.split(":")[0] + "!"], COLOURS[4]))
    if colours:
        which = "the most probable positive finding" if len(colours) == 1 else (
            f"the {len(colours)} most probable positive findings")
        lines.append(PanelLine([f"Outlined: {which}"], _GREY))
        lines.append(PanelLine(["(Grad-CAM: where the model looked)"], _GREY))
    return lines


def findings_text(predictions: Sequence[Prediction]) -> list[str]:
    """The panel as plain text lines (for logs and tests)."""
    return ["  ".join(line.cells) for line in panel_lines(predictions)]


def _frame_bytes(sc: Dataset) -> bytes:
    from pydicom.encaps import generate_frames

    return b"".join(generate_frames(sc.PixelData, number_of_frames=1))


def _orientation(source: Dataset) -> tuple[str, str] | None:
    """The source's Patient Orientation when it is two single directions highdicom accepts, else None."""
    values = [str(v) for v in source.get("PatientOrientation") or ()]
    allowed = {v.value for v in PatientOrientationValuesBiped}
    if len(values) != 2 or not set(values) <= allowed:
        return None
    return values[0], values[1]


def _blend_heat(image: np.ndarray, heatmap: Heatmap, size: tuple[int, int], colour: tuple[int, int, int]) -> None:
    """Blend one heat map in ``colour``: opacity rises smoothly from HEAT_LOW to HEAT_HIGH; a contour line."""
    # Grad-CAM comes from a grid of a few dozen cells, whose corners a blur rounds off so that the outline
    # follows the heat. The blur runs on a grid of at most _BLUR_SIDE pixels (the same relative width as on the
    # full image, at a sixteenth of the cost); heat is smooth, so bilinear upsampling after it loses nothing.
    rows, cols = fit_within((size[1], size[0]), _BLUR_SIDE)
    small = (cols, rows)  # cv2 wants (width, height)
    shrinking = small[0] * small[1] < heatmap.values.size
    heat = cv2.resize(heatmap.values, small, interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    heat = cv2.GaussianBlur(heat, (0, 0), max(small) / 60)
    # The opacity is computed on the small grid too and upsampled like the heat (both are smooth there): over the
    # whole image run only the blend and the outline's threshold. The fill is built per channel (cv2.merge), which
    # is several times faster than broadcasting the colour into an RGB array.
    t = np.clip((heat - HEAT_LOW) / (HEAT_HIGH - HEAT_LOW), 0.0, 1.0)
    opacity = t * t * (3.0 - 2.0 * t) * HEAT_ALPHA  # smoothstep: no hard edge
    alpha = cv2.resize(opacity.astype(np.float32), size, interpolation=cv2.INTER_LINEAR)
    fill = cv2.merge([np.full(alpha.shape, value, np.uint8) for value in colour])
    np.copyto(image, cv2.blendLinear(image, fill, 1.0 - alpha, alpha))
    heat = cv2.resize(heat, size, interpolation=cv2.INTER_LINEAR)
    mask = (heat >= HEAT_CONTOUR).astype(np.uint8)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    # specks (under 0.2 % of the image) would read as small lesions: the soft fill shows them, no outline
    contours = [c for c in contours if cv2.contourArea(c) >= 0.002 * size[0] * size[1]]
    cv2.drawContours(image, contours, -1, colour, max(1, round(max(size) / 400)), cv2.LINE_AA)


def _scale_for(height: int) -> float:
    """The font scale whose capital letters are about 60 % of ``height``."""
    (_, h), _ = cv2.getTextSize("X", _FONT, 1.0, 1)
    return 0.6 * height / h


def _put(
    image: np.ndarray, text: str, org: tuple[int, int], scale: float, colour: tuple[int, int, int]
) -> None:
    cv2.putText(image, text, org, _FONT, scale, colour, max(1, round(scale * 1.6)), cv2.LINE_AA)


def _width(text: str, scale: float) -> int:
    return cv2.getTextSize(text, _FONT, scale, max(1, round(scale * 1.6)))[0][0]


def _panel(lines: Sequence[PanelLine], unit: int, height: int) -> np.ndarray:
    """The findings panel, ``height`` rows tall, as wide as its text needs."""
    scale = _scale_for(unit)
    pad = unit // 2
    swatch = unit
    table = [line for line in lines if len(line.cells) == 4]
    col_widths = [max(_width(line.cells[c], scale) for line in table) for c in range(4)] if table else [0] * 4
    gap = unit
    x = [pad + swatch + pad]
    for w in col_widths[:3]:
        x.append(x[-1] + w + gap)
    table_width = x[3] + col_widths[3]
    wide = max((_width(line.cells[0], scale) for line in lines if len(line.cells) == 1), default=0)
    width = max(table_width, pad + wide) + pad
    panel = np.empty((height, width, 3), np.uint8)
    panel[:] = _PANEL
    for i, line in enumerate(lines):
        baseline = pad + (i + 1) * unit - unit // 4
        if baseline > height - pad:
            break
        if line.swatch is not None:
            top = baseline - round(unit * 0.7)
            cv2.rectangle(panel, (pad, top), (pad + swatch - 2, top + round(unit * 0.7)), line.swatch, -1)
        if len(line.cells) == 1:
            _put(panel, line.cells[0], (pad, baseline), scale, line.colour)
        else:
            for c, text in enumerate(line.cells):
                _put(panel, text, (x[c], baseline), scale, line.colour)
    return panel


def _banner(width: int, unit: int) -> np.ndarray:
    """A black band with the yellow warning, ``width`` wide."""
    height = round(unit * 1.6)
    band = np.zeros((height, width, 3), np.uint8)
    scale = min(_scale_for(round(unit * 1.2)), 0.94 * width / max(1, _width(BANNER, 1.0)))
    w = _width(BANNER, scale)
    (_, h), _ = cv2.getTextSize(BANNER, _FONT, scale, 1)
    _put(band, BANNER, ((width - w) // 2, (height + h) // 2), scale, _YELLOW)
    return band
