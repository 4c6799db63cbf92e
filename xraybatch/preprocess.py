"""Stored pixel values -> display image in [0, 1] (for people) and model input (for the networks).

Two paths leave the decoded pixels:

* **Display** (:func:`to_display`, shown in the Secondary Capture). The order follows PS3.3 C.7.6.3.1 and C.11:
  Modality LUT (Rescale Slope/Intercept or Modality LUT Sequence), then VOI LUT (VOI LUT Sequence or Window
  Center/Width; a robust percentile window when the file has neither), then MONOCHROME1 inversion *after* VOI, so
  that bone is bright in every display image.
* **Model input** (:func:`model_input`, what a bundle's network sees), by the bundle's
  :class:`~xraybatch.models.registry.ModelPreprocess`. With ``contrast = "equalise"`` the modality values, in
  bone-bright order, are resampled to the model's size and rank-equalised (:func:`equalise`). Bit depth,
  MONOCHROME1/2, rescale slope/intercept and a linear VOI window are affine maps of the same picture: averaging
  commutes with them and a rank transform is blind to them, so the network gets the same input for every such
  encoding, however the file asks to be windowed for display. The window is therefore not applied on this path
  (it can only clip, and a clipped copy would differ).

Resampling to the model's input uses SimpleITK: a ``BinShrink`` by the integer factor (an average, so no
aliasing) and a linear resample to the exact size. Training calls :func:`model_input_8bit` and
:func:`model_input` on its images, so a network sees the same pixels in training and in production.
"""

from __future__ import annotations

import logging

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from xraybatch.domain import DisplayImage, ModelInput, XrayImage
from xraybatch.errors import InvalidInputError
from xraybatch.logs import mask_exception_text
from xraybatch.models.registry import ModelPreprocess
from xraybatch.settings import PreprocessConfig

_LUT_ERRORS = (ValueError, TypeError, KeyError, IndexError, AttributeError, ZeroDivisionError, OverflowError)

logger = logging.getLogger(__name__)


def to_display(image: XrayImage, cfg: PreprocessConfig) -> DisplayImage:
    """Apply modality LUT, VOI (or a percentile window) and MONOCHROME1 inversion.

    Parameters
    ----------
    image
        A decoded single-frame grayscale radiograph.
    cfg
        ``percentile_window`` is used only where the file has no VOI LUT and no window.

    Returns
    -------
    DisplayImage
        float32 in [0, 1], bone bright, in the source geometry; ``notes`` lists what was applied.

    Raises
    ------
    InvalidInputError
        When the image is constant (no contrast to show) or its LUT attributes are unusable.
    """
    ds = image.dataset
    notes: list[str] = list(image.notes)
    levels = _Levels.of(image.pixels)  # every step below maps each stored value on its own: run it per value
    try:
        values = apply_modality_lut(image.pixels if levels is None else levels.values, ds)
        if "ModalityLUTSequence" in ds:
            notes.append("modality LUT applied")
        elif float(ds.get("RescaleSlope", 1) or 1) != 1 or float(ds.get("RescaleIntercept", 0) or 0) != 0:
            notes.append("rescale slope/intercept applied")
        has_voi = "VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds)
        if has_voi:
            prefer_lut = cfg.prefer_voi_lut or "WindowCenter" not in ds
            windowed = apply_voi_lut(values, ds, index=0, prefer_lut=prefer_lut)
            low, high = _voi_output_range(values, ds, prefer_lut)
            used = "VOI LUT" if prefer_lut and "VOILUTSequence" in ds else "window center/width"
            notes.append(f"{used} applied")
        else:
            windowed = values
            low, high = percentile_window(values, cfg, None if levels is None else levels.counts)
            notes.append(f"no VOI in file: percentile window {cfg.percentile_window[0]}-{cfg.percentile_window[1]}")
    except _LUT_ERRORS as err:
        detail = mask_exception_text(f"{type(err).__name__}: {err}")[:200]  # pydicom quotes the values it rejects
        raise InvalidInputError(f"modality/VOI LUT attributes are unusable: {detail}") from err
    display = _normalise(windowed, low, high)
    if image.header.photometric_interpretation == "MONOCHROME1":
        display = 1.0 - display
        notes.append("MONOCHROME1 inverted")
    return DisplayImage(pixels=display if levels is None else levels.expand(display), notes=tuple(notes))


class _Levels:
    """An integer image as its distinct stored values: ``values[i]`` occurs ``counts[i]`` times.

    A radiograph of millions of pixels holds a few thousand distinct values, and the modality LUT, the VOI,
    the normalisation and the MONOCHROME1 inversion each map one value to one value. Running them on
    ``values`` and expanding the result with one table lookup (:meth:`expand`) gives, pixel for pixel, what
    they give on the whole image, at a fraction of the cost.
    """

    def __init__(self, offsets: np.ndarray, present: np.ndarray, counts: np.ndarray, low: int,
                 dtype: np.dtype) -> None:
        self.offsets = offsets  # per pixel: stored value - low
        self.present = present  # the offsets that occur, ascending
        self.counts = counts  # pixels per present offset
        self.values = (present + low).astype(dtype)  # the distinct stored values, in the image's dtype

    @classmethod
    def of(cls, stored: np.ndarray) -> _Levels | None:
        """The levels of ``stored``; None for non-integer values or a range over 2**20 (too sparse to gain)."""
        if not np.issubdtype(stored.dtype, np.integer) or stored.size == 0:
            return None
        low, high = int(stored.min()), int(stored.max())
        if high - low >= 1 << 20:
            return None
        offsets = stored if low == 0 and stored.dtype.itemsize <= 2 else stored.astype(np.int64) - low
        histogram = np.bincount(offsets.ravel())
        present = np.flatnonzero(histogram)
        return cls(offsets, present, histogram[present], low, stored.dtype)

    def expand(self, per_value: np.ndarray) -> np.ndarray:
        """The image whose every pixel holds ``per_value`` of its stored value (``per_value`` parallel to
        ``values``), in ``per_value``'s dtype."""
        table = np.zeros(int(self.present[-1]) + 1, dtype=per_value.dtype)
        table[self.present] = per_value
        return table[self.offsets]


def resample(pixels: np.ndarray, size: tuple[int, int], dtype: type = np.float32) -> np.ndarray:
    """Resample a 2-D float image to ``size`` (height, width) with SimpleITK, averaging when shrinking.

    ``dtype`` is float32 (the display path) or float64 (the equalised model input, whose ranks must not depend
    on rounding).

    The aspect ratio is not kept: the whole image is stretched onto the model grid, as in training.
    """
    if pixels.ndim != 2:
        raise ValueError(f"pixels must be 2-D, got shape {pixels.shape}")
    out_h, out_w = int(size[0]), int(size[1])
    img = sitk.GetImageFromArray(np.ascontiguousarray(pixels, dtype=dtype))
    in_w, in_h = img.GetSize()
    shrink = [max(1, in_w // out_w), max(1, in_h // out_h)]
    if shrink != [1, 1]:
        img = sitk.BinShrink(img, shrink)
        in_w, in_h = img.GetSize()
    if (in_w, in_h) == (out_w, out_h):
        return sitk.GetArrayFromImage(img).astype(dtype, copy=False)
    # Map pixel centres: physical extent of the input (spacing 1) spread over the output grid.
    spacing = (in_w / out_w, in_h / out_h)
    origin = ((spacing[0] - 1.0) / 2.0, (spacing[1] - 1.0) / 2.0)
    img.SetOrigin((0.0, 0.0))
    img.SetSpacing((1.0, 1.0))
    out = sitk.Resample(
        img, (out_w, out_h), sitk.Transform(), sitk.sitkLinear, origin, spacing, img.GetDirection(), 0.0,
        sitk.sitkFloat64 if dtype == np.float64 else sitk.sitkFloat32,
        True,  # nearest-neighbour extrapolation at the borders instead of zeros
    )
    return sitk.GetArrayFromImage(out)


def to_model_input(display: DisplayImage, size: tuple[int, int]) -> ModelInput:
    """Resample a display image to a model's input ``size`` (height, width).

    This is the transform training applies to every image (JPEG, PNG or DICOM), so a model sees the same
    pixels in training and in production.
    """
    pixels = resample(display.pixels, size)
    np.clip(pixels, 0.0, 1.0, out=pixels)
    return ModelInput(pixels=pixels, source_shape=(display.pixels.shape[0], display.pixels.shape[1]))


def _voi_output_range(values: np.ndarray, ds: Dataset, prefer_lut: bool) -> tuple[float, float]:
    """The output range of the VOI transform: the extremes of the input type pushed through it.

    A VOI LUT is probed over its own domain (PS3.3 C.11.2.1.1: every entry, first value mapped onwards): pydicom
    indexes the LUT through an array of the LUT's dtype, so a probe outside that domain (the float extremes of
    rescaled values, or input values beyond ``first + 65535``) wraps around instead of clipping.
    """
    if prefer_lut and ds.get("VOILUTSequence"):
        entries, first = (int(v) for v in ds.VOILUTSequence[0].LUTDescriptor[:2])
        probe = np.arange(first, first + (entries or 1 << 16), dtype=np.int64)
    elif np.issubdtype(values.dtype, np.integer):
        info = np.iinfo(values.dtype)
        probe = np.array([info.min, info.max], dtype=values.dtype)
    else:
        probe = np.array([-1e12, 1e12])
    out = apply_voi_lut(probe, ds, index=0, prefer_lut=prefer_lut)
    return float(np.min(out)), float(np.max(out))


def percentile_window(values: np.ndarray, cfg: PreprocessConfig,
                      counts: np.ndarray | None = None) -> tuple[float, float]:
    """The robust window (low, high) used where a file carries no VOI: the configured percentiles.

    ``counts`` (parallel to ``values``) counts each value that many times, as if repeated; the percentiles
    are numpy's default ("linear": interpolated between the two nearest ranks) of the repeated values.
    """
    if counts is None:
        low, high = np.percentile(values, cfg.percentile_window)
        return float(low), float(high)
    flat = np.asarray(values, dtype=np.float64).ravel()
    order = np.argsort(flat, kind="stable")
    ranked, ends = flat[order], np.cumsum(np.asarray(counts, dtype=np.int64).ravel()[order])
    n = int(ends[-1])

    def at_rank(k: int) -> float:  # the k-th smallest of the repeated values, from 0
        return float(ranked[np.searchsorted(ends, min(k, n - 1), side="right")])

    window = []
    for q in cfg.percentile_window:
        h = (n - 1) * q / 100.0
        k = int(np.floor(h))
        a, b = at_rank(k), at_rank(k + 1)
        window.append(a + (b - a) * (h - k))
    return window[0], window[1]


def _normalise(values: np.ndarray, low: float, high: float) -> np.ndarray:
    if not high > low:
        raise InvalidInputError("the image has no contrast (all pixels map to one value)")
    return np.clip((np.asarray(values, dtype=np.float64) - low) / (high - low), 0.0, 1.0).astype(np.float32)


def from_8bit(pixels: np.ndarray, cfg: PreprocessConfig) -> DisplayImage:
    """A display image from an 8-bit grayscale or RGB picture (JPEG/PNG training data).

    It gets the same percentile window as a DICOM file without VOI, so a training JPEG and the same
    picture stored as MONOCHROME2 DICOM give identical model inputs.
    """
    if pixels.ndim == 3:
        pixels = pixels[..., :3].mean(axis=2)
    if pixels.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale or 3-D colour array, got shape {pixels.shape}")
    levels = _Levels.of(pixels)  # as to_display does it for an integer image
    if levels is None:
        low, high = percentile_window(pixels, cfg)
        return DisplayImage(pixels=_normalise(pixels, low, high), notes=("percentile window",))
    low, high = percentile_window(levels.values, cfg, levels.counts)
    return DisplayImage(pixels=levels.expand(_normalise(levels.values, low, high)), notes=("percentile window",))


# -- model input -------------------------------------------------------------------------------------------


def equalise(values: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Rank (histogram) equalisation: each value becomes the midpoint of its cumulative share, in (0, 1).

    Equal values share one output and the order of distinct values is all that counts, so any strictly
    increasing map of ``values`` gives the same result. ``weights`` (optional, same shape) counts each value
    that many times.
    """
    flat = np.asarray(values).ravel()
    distinct, inverse = np.unique(flat, return_inverse=True)
    counts = np.bincount(inverse, weights=None if weights is None else np.asarray(weights, np.float64).ravel(),
                         minlength=len(distinct)).astype(np.float64)
    total = counts.sum()
    if len(distinct) < 2 or not total > 0:
        raise InvalidInputError("the image has no contrast (all pixels map to one value)")
    midpoints = (np.cumsum(counts) - counts / 2.0) / total
    return midpoints[inverse].reshape(np.shape(values)).astype(np.float32)


def bone_bright_values(image: XrayImage) -> np.ndarray:
    """Modality values of ``image`` (float64, source geometry), negated for MONOCHROME1 so that bone is high.

    Raises
    ------
    InvalidInputError
        When the Modality LUT attributes are unusable.
    """
    return _bone_bright(image.pixels, image.dataset, image.header.photometric_interpretation == "MONOCHROME1")


def _bone_bright(stored: np.ndarray, ds: Dataset, invert: bool) -> np.ndarray:
    """Integer stored values go through the Modality LUT once per distinct value (:class:`_Levels`)."""
    try:
        levels = _Levels.of(stored)
        if levels is not None:
            values = levels.expand(np.asarray(apply_modality_lut(levels.values, ds), np.float64))
        else:
            values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    except _LUT_ERRORS as err:
        detail = mask_exception_text(f"{type(err).__name__}: {err}")[:200]
        raise InvalidInputError(f"modality LUT attributes are unusable: {detail}") from err
    return -values if invert else values


def equalised_stored(stored: np.ndarray, ds: Dataset, invert: bool, jpeg_quality: int = 0) -> np.ndarray:
    """The ``equalise`` model input of stored values already at the model's size (training's re-encoding).

    ``ds`` holds their Modality LUT attributes; ``invert`` (MONOCHROME1) reverses the order; ``jpeg_quality`` is
    the bundle's (:class:`~xraybatch.models.registry.ModelPreprocess`).
    """
    values = _bone_bright(stored, ds, invert)
    return _ranked(as_training_jpeg(values, jpeg_quality)) if jpeg_quality else equalise(values)


def as_training_jpeg(values: np.ndarray, quality: int) -> np.ndarray:
    """Values at the model's size as a training picture held them: mapped onto 0-255 (lowest to highest),
    stored as an 8-bit grayscale JPEG of ``quality`` (Pillow, as the training pictures were written) and read
    back, as float64. ``quality`` 0 returns ``values`` as they are; so does a constant image (nothing to map).

    The map onto 0-255 ignores a linear rescale and the polarity (the values are bone bright), so the lossless
    encodings of one picture still give one input, up to the rare value that an encoding's float rounding
    puts on the other side of a half grey level.
    """
    if not quality:
        return values
    low, high = float(values.min()), float(values.max())
    if not high > low:
        return values
    import io

    from PIL import Image

    eight = np.rint((values - low) * (255.0 / (high - low))).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(eight).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as picture:
        return np.asarray(picture.convert("L"), dtype=np.float64)


def model_input(image: XrayImage, pre: ModelPreprocess, size: tuple[int, int]) -> ModelInput:
    """The model input of ``image`` for a bundle with preprocessing ``pre`` and input ``size`` (height, width).

    ``equalise``: the bone-bright modality values are resampled to ``size`` (float64), then rank-equalised, so
    the input has the same uniform histogram whatever the source resolution (training images are mostly at the
    model's size already), and an affine re-encoding (bit depth, polarity, rescale, a linear window) changes
    nothing: averaging commutes with it and the ranks ignore it.
    """
    return model_inputs(image, [(pre, size)])[(pre, size)]


def model_inputs(image: XrayImage, plans: list[tuple[ModelPreprocess, tuple[int, int]]]) -> dict[
        tuple[ModelPreprocess, tuple[int, int]], ModelInput]:
    """One model input per distinct (preprocessing, size) of the loaded bundles; each source image is made once.

    Bundles that differ only in ``jpeg_quality`` share the full-size image and its resampling to each size."""
    full: dict[object, np.ndarray] = {}
    resampled: dict[tuple[object, tuple[int, int]], np.ndarray] = {}
    out: dict[tuple[ModelPreprocess, tuple[int, int]], ModelInput] = {}
    shape = (image.pixels.shape[0], image.pixels.shape[1])
    for pre, size in plans:
        source = "equalise" if pre.contrast == "equalise" else pre  # what the full-size image depends on
        if source not in full:
            if pre.contrast == "equalise":
                full[source] = bone_bright_values(image)
            else:
                full[source] = to_display(image, PreprocessConfig(pre.percentile_window, pre.prefer_voi_lut)).pixels
        if pre.contrast == "equalise":
            if (source, size) not in resampled:
                resampled[(source, size)] = resample(full[source], size, np.float64)
            small = as_training_jpeg(resampled[(source, size)], pre.jpeg_quality)
            out[(pre, size)] = ModelInput(pixels=_ranked(small), source_shape=shape)
        else:
            out[(pre, size)] = _resampled(full[source], size)
    return out


def model_input_8bit(pixels: np.ndarray, pre: ModelPreprocess, size: tuple[int, int]) -> ModelInput:
    """The model input of an 8-bit grayscale or RGB picture (JPEG/PNG training data), as :func:`model_input`.

    The picture is treated as MONOCHROME2 stored values without LUTs, so it gives exactly the input of the
    same picture stored as a DICOM file in any bit depth, polarity or window.
    """
    if pixels.ndim == 3:
        pixels = pixels[..., :3].mean(axis=2)
    if pixels.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale or 3-D colour array, got shape {pixels.shape}")
    if pre.contrast == "equalise":
        shape = (pixels.shape[0], pixels.shape[1])
        small = as_training_jpeg(resample(np.asarray(pixels, np.float64), size, np.float64), pre.jpeg_quality)
        return ModelInput(pixels=_ranked(small), source_shape=shape)
    return to_model_input(from_8bit(pixels, PreprocessConfig(pre.percentile_window, pre.prefer_voi_lut)), size)


def _ranked(values: np.ndarray) -> np.ndarray:
    """:func:`equalise` of resampled values, after mapping them onto [0, 1] and rounding to float32.

    Two affine encodings of one picture resample to values that are equal in exact arithmetic but differ in the
    last bits of float64, which would break their ties in different orders. On the common [0, 1] scale the
    float32 rounding puts such values back together (distinct values closer than about 1e-7 of the range merge,
    the same way in every encoding).
    """
    low, high = float(values.min()), float(values.max())
    if not high > low:
        raise InvalidInputError("the image has no contrast (all pixels map to one value)")
    return equalise(((values - low) / (high - low)).astype(np.float32))


def _resampled(pixels: np.ndarray, size: tuple[int, int]) -> ModelInput:
    out = resample(pixels, size)
    np.clip(out, 0.0, 1.0, out=out)
    return ModelInput(pixels=out, source_shape=(pixels.shape[0], pixels.shape[1]))
