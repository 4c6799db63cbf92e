"""Model bundles: a directory with ``model.json`` and the weights it names, checked by sha256 at load.

``model.json`` (format 1)::

    {
      "format": 1,
      "name": "xraybatch-pneumonia",           # model id, shown in the DB and the DICOM outputs
      "version": "1.0.0",
      "task": "binary" | "multilabel",
      "architecture": "separable_cnn" | "resnet50" | "efficientnet_lite0",
      "architecture_args": {...},               # keyword arguments of the network's constructor
      "targets": ["Pneumonia"],                 # output labels, in output order
      "thresholds": {"Pneumonia": 0.5},         # per-target operating threshold on the probability
      "temperature": [1.0],                     # optional per-target calibration: sigmoid(logit / T)
      "input": {"size": [224, 224], "channels": 1, "mean": [0.0], "std": [1.0]},
      "preprocessing": {"contrast": "equalise"},  # how pixels become the model input: binding (ModelPreprocess)
      "weights": {"file": "weights.safetensors", "sha256": "..."},
      "provenance": {...},                      # training data, split manifest, command, git revision
      "metrics": {...}                          # validation metrics
    }

Target names and their codes live in :mod:`xraybatch.models.findings`; they are never retyped elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xraybatch.errors import ModelError

logger = logging.getLogger(__name__)

BUNDLE_FORMAT = 1
TASKS = ("binary", "multilabel")
SHIPPED_BUNDLES = Path(__file__).resolve().parent.parent / "bundles"


@dataclass(frozen=True)
class InputSpec:
    """What the network takes: size (height, width), channels and per-channel normalisation."""

    size: tuple[int, int]
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"mean and std need {self.channels} values, got {self.mean} and {self.std}")
        if min(self.size) < 16:
            raise ValueError(f"input size must be at least 16x16, got {self.size}")


CONTRAST_METHODS = ("equalise", "display")


@dataclass(frozen=True)
class ModelPreprocess:
    """How a bundle's model input is made from the decoded pixels: recorded in ``model.json``, binding at inference.

    ``equalise``: the modality values, in bone-bright order, rank-equalised (each distinct value becomes the
    midpoint of its cumulative share of pixels), then resampled. A rank transform ignores every monotonic
    re-encoding of the same picture (bit depth, MONOCHROME1/2, rescale slope/intercept, a VOI window or LUT
    that does not clip), so every encoding reaches the network as the same input.
    ``display``: the display image (the file's VOI, or a percentile window where it has none), as bundles of
    format 1 were trained; ``percentile_window`` and ``prefer_voi_lut`` belong to it only.
    ``jpeg_quality`` (``equalise`` only; 0: off): the training pictures were JPEG files of this quality at the
    model's size, so every input, at the model's size, is stored the same way before it is equalised
    (:func:`xraybatch.preprocess.as_training_jpeg`): a network that learnt on compressed pictures then sees
    their artefacts in a lossless full-resolution radiograph too.
    """

    contrast: str = "equalise"
    percentile_window: tuple[float, float] = (0.5, 99.5)
    prefer_voi_lut: bool = True
    jpeg_quality: int = 0

    def __post_init__(self) -> None:
        if self.contrast not in CONTRAST_METHODS:
            raise ValueError(f"preprocessing contrast must be one of {CONTRAST_METHODS}, got {self.contrast!r}")
        if not 0 <= self.jpeg_quality <= 100:
            raise ValueError(f"preprocessing jpeg_quality must be 0 (off) to 100, got {self.jpeg_quality}")
        if self.jpeg_quality and self.contrast != "equalise":
            raise ValueError("preprocessing jpeg_quality needs contrast 'equalise'")
        low, high = self.percentile_window
        if not 0.0 <= low < high <= 100.0:
            raise ValueError(f"preprocessing percentile_window must be 0 <= low < high <= 100, got {low, high}")

    @classmethod
    def from_meta(cls, values: dict[str, Any]) -> ModelPreprocess:
        """From ``model.json``'s ``preprocessing``; a block without ``contrast`` is a format-1 bundle (display)."""
        return cls(
            contrast=str(values.get("contrast", "display")),
            percentile_window=tuple(float(v) for v in values.get("percentile_window", (0.5, 99.5))),  # type: ignore[arg-type]
            prefer_voi_lut=bool(values.get("prefer_voi_lut", True)),
            jpeg_quality=int(values.get("jpeg_quality", 0)),
        )

    def to_meta(self) -> dict[str, Any]:
        """The ``preprocessing`` block of ``model.json``: every parameter, and the functions that apply them."""
        if self.contrast == "equalise":
            lossy = {"jpeg_quality": self.jpeg_quality} if self.jpeg_quality else {}
            return {"contrast": "equalise", **lossy, "function": "xraybatch.preprocess.model_input"}
        return {"contrast": "display", "percentile_window": list(self.percentile_window),
                "prefer_voi_lut": self.prefer_voi_lut, "function": "xraybatch.preprocess.model_input"}

    def describe(self) -> str:
        if self.contrast == "equalise":
            return "contrast = 'equalise'" + (f", jpeg_quality = {self.jpeg_quality}" if self.jpeg_quality else "")
        return (f"contrast = 'display', percentile_window = {list(self.percentile_window)}, "
                f"prefer_voi_lut = {str(self.prefer_voi_lut).lower()}")


@dataclass(frozen=True)
class BundleSpec:
    """A parsed ``model.json``; weights are loaded by :mod:`xraybatch.infer`."""

    path: Path
    name: str
    version: str
    task: str
    architecture: str
    architecture_args: dict[str, Any]
    targets: tuple[str, ...]
    thresholds: tuple[float, ...]
    temperature: tuple[float, ...]
    input: InputSpec
    weights_file: Path
    sha256: str
    preprocess: ModelPreprocess = field(default_factory=ModelPreprocess)  # binding: how pixels become the input
    meta: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)  # the whole model.json

    @property
    def model_id(self) -> str:
        return f"{self.name}@{self.version}"


def read_bundle(path: Path | str) -> BundleSpec:
    """Parse and validate the bundle at ``path`` (without loading the weights).

    Raises
    ------
    ModelError
        When ``model.json`` is missing or malformed, or names unknown targets.
    """
    from xraybatch.models.findings import TARGET_CODES

    path = Path(path)
    meta_file = path / "model.json"
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ModelError(f"{path} is not a model bundle: {meta_file.name} is missing") from err
    except json.JSONDecodeError as err:
        raise ModelError(f"{meta_file} is not valid JSON: {err}") from err
    try:
        if meta.get("format") != BUNDLE_FORMAT:
            raise ModelError(f"{meta_file}: format {meta.get('format')!r} is not {BUNDLE_FORMAT}")
        if meta["task"] not in TASKS:
            raise ModelError(f"{meta_file}: task {meta['task']!r} is not one of {TASKS}")
        targets = tuple(meta["targets"])
        unknown = [t for t in targets if t not in TARGET_CODES]
        if unknown:
            raise ModelError(f"{meta_file}: unknown targets {unknown}; known: {sorted(TARGET_CODES)}")
        if meta["task"] == "binary" and len(targets) != 1:
            raise ModelError(f"{meta_file}: a binary model has exactly one target, got {list(targets)}")
        thresholds = tuple(float(meta["thresholds"][t]) for t in targets)
        temperature = tuple(float(v) for v in meta.get("temperature", [1.0] * len(targets)))
        if len(temperature) != len(targets) or min(temperature) <= 0:
            raise ModelError(f"{meta_file}: temperature needs one positive value per target")
        inp = meta["input"]
        spec = InputSpec(
            size=(int(inp["size"][0]), int(inp["size"][1])),
            channels=int(inp["channels"]),
            mean=tuple(float(v) for v in inp["mean"]),
            std=tuple(float(v) for v in inp["std"]),
        )
        return BundleSpec(
            path=path,
            name=str(meta["name"]),
            version=str(meta["version"]),
            task=meta["task"],
            architecture=str(meta["architecture"]),
            architecture_args=dict(meta.get("architecture_args", {})),
            targets=targets,
            thresholds=thresholds,
            temperature=temperature,
            input=spec,
            preprocess=ModelPreprocess.from_meta(dict(meta.get("preprocessing", {}))),
            weights_file=path / meta["weights"]["file"],
            sha256=str(meta["weights"]["sha256"]).lower(),
            meta=meta,
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ModelError(f"{meta_file} is malformed ({type(err).__name__}: {err})") from err


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_weights(spec: BundleSpec) -> None:
    """Raise ModelError unless the weights file exists and matches ``spec.sha256``."""
    if not spec.weights_file.is_file():
        raise ModelError(f"bundle {spec.path}: weights file {spec.weights_file.name} is missing")
    actual = sha256_of(spec.weights_file)
    if actual != spec.sha256:
        raise ModelError(
            f"bundle {spec.path}: sha256 of {spec.weights_file.name} is {actual}, model.json says {spec.sha256}; "
            "the weights were changed or damaged, reinstall the bundle"
        )


def find_bundles(configured: tuple[str, ...] = ()) -> list[BundleSpec]:
    """The bundles to run: ``configured`` directories, or every bundle shipped with xraybatch.

    A configured directory may be a bundle or a folder of bundles.

    Raises
    ------
    ModelError
        When no bundle is found, with a message that says how to get one.
    """
    roots = [Path(p) for p in configured] if configured else [SHIPPED_BUNDLES]
    specs: list[BundleSpec] = []
    for root in roots:
        if (root / "model.json").is_file():
            specs.append(read_bundle(root))
        elif root.is_dir():
            specs.extend(read_bundle(d) for d in sorted(root.iterdir()) if (d / "model.json").is_file())
        elif configured:
            raise ModelError(f"model bundle {root} does not exist; check [model] bundles / --bundle")
    if not specs:
        where = ", ".join(str(r) for r in roots)
        raise ModelError(
            f"no model bundle found in {where}. Train one with `xraybatch train binary --data DIR --out BUNDLE` "
            "and pass it with --bundle BUNDLE (or [model] bundles in the config); xraybatch never reports "
            "results without a trained model"
        )
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ModelError(f"two bundles share a name: {names}; give each bundle a distinct name")
    return specs


def check_preprocessing(site: Any, specs: list[BundleSpec]) -> None:
    """Stop the start-up when the site's ``[preprocess] contrast`` contradicts a bundle's binding preprocessing.

    ``site`` is the :class:`~xraybatch.settings.PreprocessConfig`. Each bundle's model input is always made as its
    ``model.json`` says, whatever the site's display settings; bundles with different preprocessing run side by
    side, each on its own input.

    Raises
    ------
    ModelError
        Naming the setting, the bundle and the preprocessing the bundle was trained with.
    """
    demanded = getattr(site, "contrast", "")
    for spec in specs:
        if demanded and demanded != spec.preprocess.contrast:
            raise ModelError(
                f"[preprocess] contrast = {demanded!r} contradicts bundle {spec.model_id} ({spec.path}), which was "
                f"trained with {spec.preprocess.describe()}; a bundle's preprocessing is binding. Remove the "
                "setting, or run a bundle trained with that preprocessing"
            )


def write_model_json(path: Path, meta: dict[str, Any]) -> None:
    """Write ``model.json`` for a bundle, filling in the sha256 of its weights file."""
    meta = dict(meta)
    meta["format"] = BUNDLE_FORMAT
    weights = dict(meta["weights"])
    weights["sha256"] = sha256_of(path / weights["file"])
    meta["weights"] = weights
    (path / "model.json").write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n", encoding="utf-8")
