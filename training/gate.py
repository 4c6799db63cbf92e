"""``xraybatch train gate``: fit a bundle's input gate on its own backbone features.

The gate (:mod:`xraybatch.gate`) scores the pooled backbone activations that the bundle's network computes
for every image anyway (the whole map and its four halves, :func:`xraybatch.gate.pool`), and stops the images
unlike the chest radiographs it was trained on. This module builds what the scores need, from images only:

* **chests**: the training side (``split == train``) of each data root's split manifest (Kermany pediatric and
  NIH adult radiographs), so both populations are in distribution; at most ``max_chests_per_root`` per root (a
  seeded sample);
* **negatives**, made from a seeded sample of those training chests: turned 90, 180 and 270 degrees, flipped
  upside down, strongly cropped (a zoomed-in patch of 20-45 % of each side); pictures that are no radiograph
  (noise, smooth gradients, textures, shapes); and the non-chest images shipped by ``pydicom-data`` (CT, MR,
  NM, ultrasound, secondary captures), when installed. Left-right mirror images are *not* negatives (a mirrored
  chest is still a chest), nor are polarity-inverted chests (a washed-out portable film resembles one, and
  real archives hold chests stored with the wrong polarity): both are scored on validation chests as checks
  and reported;
* **validation**: the validation side (``split == val``) of every manifest and the ``--val-images`` files
  (e.g. the official Kermany val split and real chest DICOMs), which set the thresholds, plus negatives made the
  same way from validation images and held-out non-chest files, which measure how much is kept out;
* **must-reject cases**: ``--reject`` files (e.g. a CR extremity, a dog's lateral thorax, with their tags
  removed or not: the gate reads pixels only), each ``--turn`` chest turned 90 degrees and flipped upside down,
  a noise picture and a smooth gradient. The command fails, writing nothing, when the thresholds would let one
  of them through.

Every image reaches the network through the bundle's own preprocessing (:func:`xraybatch.preprocess.model_input`
for DICOM files, :func:`~xraybatch.preprocess.model_input_8bit` for pictures) and
:meth:`xraybatch.infer.Predictor.forward`, so the features are those the pipeline computes. They are cached
per network, file content and transform in ``cache_dir``, so a second fit (another rule, another margin)
costs no forward pass.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from training.datasets import DICOM_SUFFIXES, IMAGE_SUFFIXES, ImageSet, is_dicom, scan
from xraybatch.models.registry import SHIPPED_BUNDLES, BundleSpec, ModelPreprocess

logger = logging.getLogger(__name__)

SEED = 20261202
FEATURE_CACHE_VERSION = 2  # 2: global + halves pooling
CHEST_NEGATIVE_TRANSFORMS = ("rot90", "rot180", "rot270", "flipud", "crop")
# Scored on validation chests and reported, none is a negative: a mirror image, the polarity inverted, and
# another contrast (gamma), which a bundle with "equalise" preprocessing does not see at all.
CHECK_TRANSFORMS = ("fliplr", "invert", "gamma:0.6", "gamma:1.6")
GENERATED_KINDS = ("noise", "gradient", "texture", "shapes")
# Non-chest images shipped by pydicom-data / pydicom (CT, MR, NM, US, secondary captures). The CR extremity
# (RG3_*) and the chest (RG1_*) are not among them: they are test cases and validation images.
NON_CHEST_TESTDATA = (
    "693_UNCI.dcm", "CT_small.dcm", "MR_small.dcm", "MR2_UNCI.dcm", "MR-SIEMENS-DICOM-WithOverlays.dcm",
    "JPEG2000_UNC.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm", "emri_small.dcm", "examples_overlay.dcm",
    "bad_sequence.dcm", "J2K_pixelrep_mismatch.dcm", "explicit_VR-UN.dcm", "US1_UNCI.dcm", "OBXXXX1A.dcm",
    "examples_rgb_color.dcm", "examples_palette.dcm", "SC_rgb.dcm", "mlut_18.dcm", "vlut_04.dcm", "image_dfl.dcm",
    "eCT_Supplemental.dcm", "examples_ybr_color.dcm", "color3d_jpeg_baseline.dcm", "SC_jpeg_no_color_transform.dcm",
)
NON_CHEST_VARIANTS = ("", "rot90", "crop")


@dataclass(frozen=True)
class Item:
    """One image the gate is fitted or checked on.

    ``path`` is a file (``None`` for a generated picture), ``transform`` what is done to its pixels first
    (``""``: nothing; ``rot90``, ``rot180``, ``rot270``, ``flipud``, ``fliplr``, ``invert``, ``crop:SEED``;
    for generated pictures ``noise:SEED`` and the like), ``group`` where it counts (``chest:train:nih``,
    ``negative:train:rot90``, ``chest:val:kermany``, ``reject:extremity`` ...), ``sha256`` of the file's bytes.
    """

    path: Path | None
    transform: str
    group: str
    sha256: str = ""
    other: bool = False  # a non-chest DICOM image (any modality, colour allowed), read as a picture
    frame: int = 0  # of a multi-frame non-chest image: the frame used

    @property
    def key(self) -> str:
        """Names the item's features in the cache: same file content and transform, same features."""
        source = self.sha256 if self.path is not None else "generated"
        return f"{source}:{'other' if self.other else 'image'}:{self.frame}:{self.transform}"

    @property
    def label(self) -> str:
        """How reports name the item: the file name (no folders) and the transform."""
        name = self.path.name if self.path is not None else "generated"
        return f"{name} {self.transform}".strip()


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- pictures --------------------------------------------------------------------------------------------


def transform_pixels(pixels: np.ndarray, transform: str) -> np.ndarray:
    """``pixels`` (2-D stored values) after ``transform`` (see :class:`Item`); integer values stay integers."""
    name, _, arg = transform.partition(":")
    if name == "":
        return pixels
    if name in ("rot90", "rot180", "rot270"):
        return np.ascontiguousarray(np.rot90(pixels, k={"rot90": 1, "rot180": 2, "rot270": 3}[name]))
    if name == "flipud":
        return np.ascontiguousarray(pixels[::-1])
    if name == "fliplr":
        return np.ascontiguousarray(pixels[:, ::-1])
    if name == "invert":
        low, high = pixels.min(), pixels.max()
        return (high - pixels + low).astype(pixels.dtype)
    if name == "gamma":
        low, span = float(pixels.min()), float(pixels.max()) - float(pixels.min())
        scaled = ((pixels.astype(np.float64) - low) / (span or 1.0)) ** float(arg)
        return np.round(low + scaled * span).astype(pixels.dtype)
    if name == "crop":
        rng = np.random.default_rng(int(arg or 0))
        rows, cols = pixels.shape
        side = rng.uniform(0.2, 0.45)
        h, w = max(16, int(rows * side)), max(16, int(cols * side))
        top, left = int(rng.integers(0, rows - h + 1)), int(rng.integers(0, cols - w + 1))
        return np.ascontiguousarray(pixels[top:top + h, left:left + w])
    raise ValueError(f"unknown transform {transform!r}")


def generated_picture(transform: str, size: int = 512) -> np.ndarray:
    """A picture that is no radiograph, as 12-bit stored values: ``noise:SEED``, ``gradient:SEED``,
    ``texture:SEED`` (smoothed noise at a random scale, stripes or a checkerboard) or ``shapes:SEED``."""
    from scipy.ndimage import gaussian_filter

    name, _, arg = transform.partition(":")
    rng = np.random.default_rng(int(arg or 0))
    y, x = np.mgrid[0:size, 0:size] / size
    if name == "noise":
        kind = int(rng.integers(0, 3))
        if kind == 0:
            img = rng.uniform(size=(size, size))
        elif kind == 1:
            img = rng.normal(size=(size, size))
        else:
            img = (rng.uniform(size=(size, size)) < rng.uniform(0.05, 0.5)).astype(float)
    elif name == "gradient":
        if rng.uniform() < 0.5:
            angle = rng.uniform(0, 2 * math.pi)
            img = math.cos(angle) * x + math.sin(angle) * y
        else:
            cy, cx = rng.uniform(0, 1, size=2)
            img = np.hypot(y - cy, x - cx)
        img = img ** rng.uniform(0.5, 2.0) if img.min() >= 0 else img
    elif name == "texture":
        kind = int(rng.integers(0, 3))
        if kind == 0:
            img = gaussian_filter(rng.normal(size=(size, size)), sigma=rng.uniform(1, 40))
        elif kind == 1:
            angle, period = rng.uniform(0, math.pi), rng.uniform(0.02, 0.3)
            img = np.sin(2 * math.pi * (math.cos(angle) * x + math.sin(angle) * y) / period)
        else:
            cells = int(rng.integers(2, 24))
            img = ((np.floor(x * cells) + np.floor(y * cells)) % 2).astype(float)
    elif name == "shapes":
        img = np.full((size, size), rng.uniform())
        for _ in range(int(rng.integers(1, 12))):
            cy, cx, ry, rx = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.03, 0.4), rng.uniform(0.03, 0.4)
            mask = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1 if rng.uniform() < 0.5 else (
                (np.abs(y - cy) <= ry) & (np.abs(x - cx) <= rx))
            img[mask] = rng.uniform()
        img = gaussian_filter(img, sigma=rng.uniform(0, 4)) + rng.normal(scale=rng.uniform(0, 0.05), size=img.shape)
    else:
        raise ValueError(f"unknown generated picture {transform!r}")
    img = np.asarray(img, dtype=np.float64)
    span = img.max() - img.min()
    img = (img - img.min()) / (span if span > 0 else 1.0)
    return np.round(img * 4095).astype(np.uint16)


def non_chest_picture(path: Path, frame: int = 0) -> np.ndarray:
    """A non-chest DICOM image as a 2-D picture in display order (grey; colour and palette images averaged)."""
    import pydicom
    from pydicom.pixels import apply_color_lut, apply_modality_lut

    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        pixels = pixels[min(frame, frames - 1)]
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric == "PALETTE COLOR":
        pixels = apply_color_lut(pixels, ds)
    if pixels.ndim == 3:
        return np.asarray(pixels, dtype=np.float64)[..., :3].mean(axis=2)
    values = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float64)
    return -values if photometric == "MONOCHROME1" else values


def non_chest_items(group: str = "negative:train:other") -> list[Item]:
    """The :data:`NON_CHEST_TESTDATA` files that are installed, each as is, turned and cropped."""
    try:
        from pydicom.data import get_testdata_file
    except ImportError:  # pragma: no cover - pydicom always has it
        return []
    items: list[Item] = []
    missing = []
    for name in NON_CHEST_TESTDATA:
        found = get_testdata_file(name)
        if found is None:
            missing.append(name)
            continue
        path = Path(str(found))
        digest = file_sha256(path)
        for i, variant in enumerate(NON_CHEST_VARIANTS):
            transform = f"crop:{SEED + i + len(items)}" if variant == "crop" else variant
            items.append(Item(path, transform, group, digest, other=True, frame=i))
    if missing:
        logger.info("non-chest negatives: %d of %d pydicom test files are not installed (%s)", len(missing),
                    len(NON_CHEST_TESTDATA), ", ".join(missing[:5]))
    return items


def model_input_of(item: Item, pre: ModelPreprocess, size: tuple[int, int]) -> np.ndarray:
    """The item's (H, W) float32 model input, through the bundle's preprocessing functions."""
    from training.datasets import _read_dicom
    from xraybatch.preprocess import model_input, model_input_8bit

    if item.path is None:
        return model_input_8bit(generated_picture(item.transform), pre, size).pixels
    if item.other:
        picture = transform_pixels(non_chest_picture(item.path, item.frame), item.transform)
        return model_input_8bit(picture, pre, size).pixels
    if is_dicom(item.path):
        image = _read_dicom(item.path)
        if item.transform:
            image = replace(image, pixels=transform_pixels(image.pixels, item.transform))
        return model_input(image, pre, size).pixels
    from PIL import Image

    with Image.open(item.path) as img:
        pixels = np.asarray(img.convert("L"))
    return model_input_8bit(transform_pixels(pixels, item.transform), pre, size).pixels


# -- features --------------------------------------------------------------------------------------------


def feature_cache_file(spec: BundleSpec, cache_dir: Path) -> Path:
    """One cache file per network (weights sha256), preprocessing and input size."""
    digest = hashlib.sha256(json.dumps({
        "v": FEATURE_CACHE_VERSION, "weights": spec.sha256, "pre": spec.preprocess.to_meta(),
        "size": list(spec.input.size), "input": [list(spec.input.mean), list(spec.input.std)],
    }).encode()).hexdigest()[:20]
    return Path(cache_dir) / f"gate-features-{spec.name}-{digest}.npz"


def _load_cache(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        return {}
    with np.load(path) as data:
        return {str(k): v for k, v in zip(data["keys"], data["features"])}


def _save_cache(path: Path, cache: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, keys=np.array(list(cache), dtype=str), features=np.stack(list(cache.values())).astype(np.float32))
    tmp.replace(path)


def extract_features(
    spec: BundleSpec,
    items: Sequence[Item],
    cache_dir: Path | None = None,
    batch_size: int = 32,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """The pooled backbone features (N, C) of ``items``, as the pipeline computes them, cached by item key."""
    from xraybatch.domain import ModelInput
    from xraybatch.gate import pool
    from xraybatch.infer import Predictor

    cache_file = feature_cache_file(spec, cache_dir) if cache_dir is not None else None
    cache = _load_cache(cache_file) if cache_file is not None else {}
    todo = list(dict.fromkeys(item.key for item in items if item.key not in cache))
    by_key = {item.key: item for item in items}
    if todo:
        predictor = Predictor(spec)
        logger.info("gate features: %d images to run through %s (%d cached)", len(todo), spec.model_id,
                    len(by_key) - len(todo))
        start, saved = time.perf_counter(), time.perf_counter()
        for first in range(0, len(todo), batch_size):
            keys = todo[first:first + batch_size]
            inputs = [model_input_of(by_key[k], spec.preprocess, spec.input.size) for k in keys]
            feats = pool(predictor.forward([ModelInput(px, px.shape) for px in inputs]).activations)
            cache.update(zip(keys, feats.astype(np.float32)))
            done = first + len(keys)
            if progress is not None:
                progress(done, len(todo))
            if cache_file is not None and time.perf_counter() - saved > 120:
                _save_cache(cache_file, cache)
                saved = time.perf_counter()
                rate = done / (saved - start)
                logger.info("gate features: %d/%d (%.1f images/s)", done, len(todo), rate)
        if cache_file is not None:
            _save_cache(cache_file, cache)
    return np.stack([cache[item.key] for item in items]).astype(np.float64)


# -- which images ----------------------------------------------------------------------------------------


def find_manifest(root: Path, bundle: Path) -> Path:
    """The split manifest for data root ``root``: that of the first bundle among ``bundle`` and the shipped
    bundles that was trained on data of the same layout.

    Raises
    ------
    ValueError
        When no bundle was trained on that layout (pass ``--manifest``).
    """
    from training.datasets import detect_layout

    layout = detect_layout(root)
    candidates = [bundle] + sorted(d for d in SHIPPED_BUNDLES.iterdir() if (d / "model.json").is_file())
    for candidate in candidates:
        meta = json.loads((candidate / "model.json").read_text(encoding="utf-8"))
        prov = meta.get("provenance", {})
        manifest = candidate / str(prov.get("split_manifest", ""))
        if prov.get("layout") == layout and manifest.is_file():
            return manifest
    raise ValueError(f"no bundle among {bundle} and {SHIPPED_BUNDLES} was trained on {layout} data with a split "
                     f"manifest; pass --manifest for {root}")


def manifest_sides(root: Path, manifest: Path) -> tuple[ImageSet, ImageSet]:
    """The training and validation sides of ``root`` as the manifest records them."""
    from training.splits import read_manifest, split_from_manifest

    images = scan(root, "auto", "train")
    split = split_from_manifest(images, manifest)
    if not split.train:
        raise ValueError(f"{manifest} has no training rows for {root}")
    n_rows = sum(r["split"] in ("train", "val") for r in read_manifest(manifest))
    logger.info("%s: %d train, %d val images from %s (%d rows)", root, len(split.train), len(split.val),
                manifest, n_rows)
    return images.subset(split.train), images.subset(split.val)


def image_files(paths: Iterable[Path]) -> list[Path]:
    """Every image file (JPEG, PNG, DICOM) given or under a given folder, in sorted order."""
    found: list[Path] = []
    for path in paths:
        path = Path(path)
        candidates = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for p in candidates:
            if p.name.startswith("."):
                continue
            if p.suffix.lower() in IMAGE_SUFFIXES or (p.suffix.lower() in DICOM_SUFFIXES and is_dicom(p)):
                found.append(p)
    return found


def _sample(n_total: int, n: int, *key: str) -> list[int]:
    """``n`` of ``range(n_total)`` (all when fewer), sorted: a seeded draw of its own for each ``key``, so adding
    a transform or a data root never changes the other draws."""
    seed = int.from_bytes(hashlib.sha256(":".join((str(SEED), *key)).encode()).digest()[:8], "little")
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(n_total, size=min(n, n_total), replace=False).tolist())


def build_items(
    data: Sequence[Path],
    manifests: Sequence[Path],
    val_images: Sequence[Path],
    reject: Sequence[Path],
    turn: Sequence[Path] = (),
    negatives_per_transform: int = 100,
    val_negatives_per_transform: int = 25,
    generated: int = 100,
    max_chests_per_root: int = 2000,
) -> list[Item]:
    """Every image of the fit and of the checks, with its group (see the module docstring)."""
    items: list[Item] = []
    for root, manifest in zip(data, manifests):
        train, val = manifest_sides(root, manifest)
        name = train.layout
        chests = _sample(len(train.samples), max_chests_per_root, name, "chests")
        items += [Item(train.samples[i].path, "", f"chest:train:{name}", train.samples[i].sha256) for i in chests]
        items += [Item(s.path, "", f"chest:val:{name}", s.sha256) for s in val.samples]
        for t in CHEST_NEGATIVE_TRANSFORMS:
            for i in _sample(len(train.samples), negatives_per_transform, name, "train", t):
                s = train.samples[i]
                transform = f"crop:{SEED + i}" if t == "crop" else t
                items.append(Item(s.path, transform, f"negative:train:{t}", s.sha256))
            for i in _sample(len(val.samples), val_negatives_per_transform, name, "val", t):
                s = val.samples[i]
                transform = f"crop:{SEED + 100_000 + i}" if t == "crop" else t
                items.append(Item(s.path, transform, f"negative:val:{t}", s.sha256))
        for t in CHECK_TRANSFORMS:
            for i in _sample(len(val.samples), val_negatives_per_transform, name, "check", t):
                s = val.samples[i]
                items.append(Item(s.path, t, f"check:val:{t.replace(':', ' ')}:{name}", s.sha256))
    turned = image_files(turn)
    for path in dict.fromkeys(image_files(val_images) + turned):
        items.append(Item(path, "", "chest:val:files", file_sha256(path)))
    for path in turned:
        digest = file_sha256(path)
        items.append(Item(path, "rot90", "reject:rotated 90", digest))
        items.append(Item(path, "flipud", "reject:upside down", digest))
    for path in image_files(reject):
        items.append(Item(path, "", "reject:file", file_sha256(path)))
    for kind in GENERATED_KINDS:
        per_kind = generated if kind in ("noise", "gradient") else 2 * generated
        items += [Item(None, f"{kind}:{SEED + i}", f"negative:train:{kind}") for i in range(per_kind)]
        held_out = max(1, per_kind // 3)
        items += [Item(None, f"{kind}:{SEED + 500_000 + i}", f"negative:val:{kind}") for i in range(held_out)]
    items += [Item(None, f"noise:{SEED - 1}", "reject:noise"), Item(None, f"gradient:{SEED - 1}", "reject:gradient")]
    for item in non_chest_items():  # every fourth file is held out, to measure
        held_out = NON_CHEST_TESTDATA.index(item.path.name) % 4 == 3  # type: ignore[union-attr]
        items.append(replace(item, group="negative:val:other" if held_out else "negative:train:other"))
    return items


# -- fit -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GateFitConfig:
    """What ``xraybatch train gate`` fits (the defaults are those of the shipped gate)."""

    components: int = 64  # PCA components of the distance score (of the standardised features)
    classifier_c: float = 0.1  # inverse L2 strength (scikit-learn ``C``) of the logistic classifier
    margin: float = 1.0  # threshold = max over validation chests + margin * (that max - their median)
    max_chests_per_root: int = 2000  # training chests per data root (a seeded sample when there are more)
    negatives_per_transform: int = 100  # training chests per negative transform (per data root)
    val_negatives_per_transform: int = 25  # validation chests per negative transform (per data root)
    generated: int = 100  # noise and gradient pictures (textures and shapes: twice as many)


@dataclass(frozen=True)
class FittedGate:
    """The numbers of a gate and the definition of each score, before the thresholds are chosen."""

    tensors: dict[str, np.ndarray]
    scores: list[dict[str, Any]]  # name, kind, definition


def fit_scores(features: np.ndarray, groups: Sequence[str], cfg: GateFitConfig) -> FittedGate:
    """Fit the distance (Mahalanobis, Ledoit-Wolf) and the classifier (logistic) on the training groups.

    Chests are the ``chest:train:*`` groups, negatives the ``negative:train:*`` groups; validation and check
    groups are not looked at.
    """
    from sklearn.covariance import LedoitWolf
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression

    names = np.asarray(groups).astype(str)
    chest = np.char.startswith(names, "chest:train:")
    negative = np.char.startswith(names, "negative:train:")
    if chest.sum() < 2 * cfg.components or negative.sum() < 10:
        raise ValueError(f"the gate needs at least {2 * cfg.components} training chests and 10 negatives, "
                         f"got {int(chest.sum())} and {int(negative.sum())}")
    x = features[chest]
    center = x.mean(axis=0)
    scale = x.std(axis=0)
    scale = np.where(scale > 1e-6 * max(float(scale.max()), 1e-12), scale, 1.0)  # dead channels stay as they are
    z = (x - center) / scale
    pca = PCA(n_components=cfg.components, random_state=SEED).fit(z)
    center = center + scale * pca.mean_  # fold PCA's own centring into the standardisation (it is ~0)
    u = ((x - center) / scale) @ pca.components_.T
    lw = LedoitWolf().fit(u)
    classifier = LogisticRegression(C=cfg.classifier_c, class_weight="balanced", max_iter=5000, random_state=SEED)
    both = np.concatenate([features[chest], features[negative]])
    labels = np.concatenate([np.zeros(int(chest.sum())), np.ones(int(negative.sum()))])
    classifier.fit((both - center) / scale, labels)
    tensors = {
        "center": center, "scale": scale, "components": pca.components_, "mean": lw.location_,
        "precision": lw.precision_, "coef": classifier.coef_[0], "intercept": classifier.intercept_,
    }
    negatives = sorted({g.split(":", 2)[2] for g in names[negative]})
    scores = [
        {"name": "distance", "kind": "mahalanobis",
         "definition": (f"Mahalanobis distance of the pooled features (standardised, projected on their first "
                        f"{cfg.components} principal components) to the {int(chest.sum())} training chest "
                        f"radiographs (Ledoit-Wolf covariance, shrinkage {lw.shrinkage_:.4f})")},
        {"name": "classifier", "kind": "logistic",
         "definition": (f"logit of a logistic regression (L2, C={cfg.classifier_c}, balanced classes) of the standardised "
                        f"pooled features: {int(chest.sum())} training chests against {int(negative.sum())} "
                        f"negatives ({', '.join(negatives)}); above 0 the image looks more like a negative")},
    ]
    return FittedGate(tensors, scores)


def summarise(values: np.ndarray) -> dict[str, float]:
    """min, median, 99th percentile and max, rounded for model.json."""
    v = np.asarray(values, dtype=np.float64)
    return {"n": int(v.size), "min": round(float(v.min()), 3), "median": round(float(np.median(v)), 3),
            "p99": round(float(np.percentile(v, 99)), 3), "max": round(float(v.max()), 3)}


def choose_thresholds(scores: np.ndarray, groups: Sequence[str], margin: float) -> np.ndarray:
    """Per score: the highest score of any chest radiograph of the fit (validation or training side) plus
    ``margin`` times (that score - the validation chests' median).

    So no chest radiograph of the fit is refused, and the gate stays lenient by a share of the chests' own
    spread: a score far out of their range is needed to refuse an image. The training side counts too because
    its tail can be the heavier one (a small validation side misses rare images of a source).
    """
    names = np.asarray(groups).astype(str)
    val = np.char.startswith(names, "chest:val:")
    if not val.any():
        raise ValueError("no validation chest radiographs: the thresholds are chosen on them")
    top = scores[val | np.char.startswith(names, "chest:train:")].max(axis=0)
    return top + margin * (top - np.median(scores[val], axis=0))


def _refused(scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    return ~np.all(scores <= thresholds, axis=1)


def gate_report(scores: np.ndarray, groups: Sequence[str], labels: Sequence[str], thresholds: np.ndarray,
                names: Sequence[str]) -> dict[str, Any]:
    """Score distributions per group, false-reject and reject rates, and every must-reject case's scores."""
    kinds = np.asarray(groups).astype(str)
    refused = _refused(scores, thresholds)

    def block(mask: np.ndarray) -> dict[str, Any]:
        out: dict[str, Any] = {name: summarise(scores[mask, j]) for j, name in enumerate(names)}
        out["refused"] = int(refused[mask].sum())
        out["rate_refused"] = round(float(refused[mask].mean()), 4)
        return out

    report: dict[str, Any] = {"groups": {}, "test_cases": {}}
    for group in sorted(set(kinds.tolist())):
        if not group.startswith("reject:"):
            report["groups"][group] = block(kinds == group)
    for side in ("train", "val"):
        chest = np.char.startswith(kinds, f"chest:{side}:")
        negative = np.char.startswith(kinds, f"negative:{side}:")
        report[f"{side}_chests"] = block(chest)
        report[f"{side}_negatives"] = block(negative)
    report["false_reject_rate_validation"] = report["val_chests"]["rate_refused"]
    for i in np.flatnonzero(np.char.startswith(kinds, "reject:")).tolist():
        case = f"{kinds[i].split(':', 1)[1]}: {labels[i]}"
        report["test_cases"][case] = {**{n: round(float(scores[i, j]), 3) for j, n in enumerate(names)},
                                      "refused": bool(refused[i])}
    return report


def write_gate(bundle: Path, fitted: FittedGate, thresholds: Sequence[float] | np.ndarray,
               extra: dict[str, Any]) -> dict[str, Any]:
    """Write ``gate.safetensors`` and the ``gate`` block of ``model.json`` into ``bundle``; returns the block."""
    from safetensors.numpy import save_file

    from xraybatch.gate import GATE_FORMAT, PARTS, POOLING
    from xraybatch.models.registry import sha256_of, write_model_json

    file = bundle / "gate.safetensors"
    tmp = bundle / "gate.safetensors.tmp"
    save_file({k: np.ascontiguousarray(v, dtype=np.float64) for k, v in fitted.tensors.items()}, str(tmp))
    mask = os.umask(0)
    os.umask(mask)
    tmp.chmod(0o666 & ~mask)  # safetensors writes 0600; the bundle's other files follow the umask
    tmp.replace(file)
    channels = int(fitted.tensors["center"].shape[0]) // len(PARTS)
    block: dict[str, Any] = {
        "format": GATE_FORMAT,
        "file": file.name,
        "sha256": sha256_of(file),
        "pooling": POOLING,
        "features": (f"average pools of the backbone activations ({channels} channels, the network's own): the "
                     f"whole map, its top, bottom, left and right halves ({len(PARTS) * channels} numbers)"),
        "channels": channels,
        "scores": [{**s, "threshold": round(float(t), 4)} for s, t in zip(fitted.scores, thresholds)],
        **extra,
    }
    meta = json.loads((bundle / "model.json").read_text(encoding="utf-8"))
    meta["gate"] = block
    write_model_json(bundle, meta)
    write_card_section(bundle, block)
    return block


CARD_HEADING = "## Input gate"


def write_card_section(bundle: Path, block: dict[str, Any]) -> None:
    """Replace (or add) the model card's input-gate section."""
    card = bundle / "model_card.md"
    text = card.read_text(encoding="utf-8") if card.is_file() else ""
    if CARD_HEADING in text:
        head, _, rest = text.partition(CARD_HEADING)
        following = rest.find("\n## ")
        text = head.rstrip("\n") + "\n\n" + (rest[following + 1:] if following >= 0 else "")
    report = block["report"]
    lines = [CARD_HEADING, "",
             ("Before any finding is reported, the pooled backbone features of the image are scored; an image over "
              "a threshold ends `not_applicable` (\"input gate: ...\"). Fitted with "
              f"`{' '.join(block['provenance']['command'])}`."), "",
             f"Rule: {block['rule']}", "",
             "| score | definition | threshold |", "|---|---|---|"]
    lines += [f"| {s['name']} | {s['definition']} | {s['threshold']} |" for s in block["scores"]]
    names = [s["name"] for s in block["scores"]]
    lines += ["", "| images | n | " + " | ".join(f"{n} min / median / max" for n in names) + " | refused |",
              "|---|---|" + "---|" * len(names) + "---|"]
    for key, row in [("validation chests", report["val_chests"]), ("training chests", report["train_chests"]),
                     ("validation negatives", report["val_negatives"]),
                     ("training negatives", report["train_negatives"])]:
        first = row[names[0]]
        cells = " | ".join(f"{row[n]['min']} / {row[n]['median']} / {row[n]['max']}" for n in names)
        lines.append(f"| {key} | {first['n']} | {cells} | {row['refused']} ({row['rate_refused']:.2%}) |")
    checks = [(g, row) for g, row in report["groups"].items() if g.startswith("check:")]
    if checks:
        lines += ["", "Checks on validation chests (neither is a negative; reported, not enforced):", "",
                  "| images | n | " + " | ".join(f"{n} max" for n in names) + " | refused |",
                  "|---|---|" + "---|" * len(names) + "---|"]
        lines += [f"| {g.split(':', 2)[2]} | {row[names[0]]['n']} | " + " | ".join(str(row[n]["max"]) for n in names)
                  + f" | {row['refused']} |" for g, row in checks]
    lines += ["", "Must-reject cases (the command fails if one passes):", ""]
    lines += [f"- {case}: " + ", ".join(f"{n} {v[n]}" for n in names) + (" (refused)" if v["refused"] else " (PASSED)")
              for case, v in report["test_cases"].items()]
    card.write_text(text.rstrip("\n") + ("\n\n" if text.strip() else "") + "\n".join(lines) + "\n", encoding="utf-8")


RULE = ("an image passes when every score is at or below its threshold; each threshold is the highest score of "
        "any chest radiograph of the fit (validation or training side) plus {margin} x (that highest score - the "
        "validation chests' median), so that no chest radiograph of the fit is refused and a score well outside "
        "their range is needed to refuse an image; the fit fails if a must-reject case would pass")


def fit_gate(
    bundle: Path,
    data: Sequence[Path],
    manifests: Sequence[Path | None] = (),
    val_images: Sequence[Path] = (),
    reject: Sequence[Path] = (),
    turn: Sequence[Path] = (),
    cfg: GateFitConfig = GateFitConfig(),
    cache_dir: Path | None = None,
    command: Sequence[str] = (),
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Fit the input gate of ``bundle`` and write it into the bundle (``gate.safetensors``, ``model.json``).

    ``manifests`` align with ``data`` (``None``: :func:`find_manifest`). Returns the ``gate`` block.

    Raises
    ------
    ValueError
        When the data or manifests do not fit, or when a must-reject case would pass the chosen thresholds
        (nothing is written then).
    """
    from training.train import git_revision
    from xraybatch.models.registry import read_bundle

    spec = read_bundle(bundle)
    data = [Path(d) for d in data]
    chosen = [Path(m) if m is not None else find_manifest(d, bundle)
              for d, m in zip(data, list(manifests) + [None] * (len(data) - len(manifests)))]
    items = build_items(data, chosen, val_images, reject, turn, cfg.negatives_per_transform,
                        cfg.val_negatives_per_transform, cfg.generated, cfg.max_chests_per_root)
    started = time.perf_counter()
    features = extract_features(spec, items, cache_dir, progress=progress)
    groups = [item.group for item in items]
    fitted = fit_scores(features, groups, cfg)
    from xraybatch.gate import PARTS, Gate, Score

    probe = Gate(spec.model_id, features.shape[1] // len(PARTS),
                 tuple(Score(s["name"], s["kind"], math.inf) for s in fitted.scores), fitted.tensors)
    scores = probe.score_features(features)
    thresholds = choose_thresholds(scores, groups, cfg.margin)
    names = [s["name"] for s in fitted.scores]
    report = gate_report(scores, groups, [item.label for item in items], thresholds, names)
    passed = [case for case, v in report["test_cases"].items() if not v["refused"]]
    if passed:
        scored = {case: {n: report["test_cases"][case][n] for n in names} for case in passed}
        raise ValueError(f"the gate would let must-reject cases through at thresholds "
                         f"{dict(zip(names, np.round(thresholds, 3).tolist()))}: {scored}; nothing was written. "
                         "A smaller --margin tightens the thresholds (check the validation chests' scores first)")
    extra = {
        "rule": RULE.format(margin=cfg.margin),
        "false_reject_rate_validation": report["false_reject_rate_validation"],
        "report": report,
        "provenance": {
            "command": list(command),
            "data": [str(d) for d in data],
            "manifests": [str(m) for m in chosen],
            "val_images": [str(p) for p in val_images],
            "turn": [str(p) for p in turn],
            "reject": [str(p) for p in reject],
            "config": {k: getattr(cfg, k) for k in GateFitConfig.__dataclass_fields__},
            "seed": SEED,
            "images": len(items),
            "seconds": round(time.perf_counter() - started, 1),
            "git_revision": git_revision(),
        },
    }
    return write_gate(bundle, fitted, thresholds, extra)

