"""Patient-wise train/validation splits, reproducible from a seed, saved as a manifest in the bundle.

Images are first joined into *groups*: two images share a group when they share a patient id or are
byte-identical (same sha256), transitively (union-find). Whole groups are then assigned to validation, class
stratum by class stratum, in a seeded random order until the stratum's validation share is reached. A group's
stratum is, for one target, its label pattern (``1`` for Pneumonia, or the most common pattern of its images);
for several targets (NIH), the rarest target any of its images carries (label patterns are too many to
stratify by: most would hold one group), so every finding with at least two patients gets validation
positives. So no
patient and no duplicate image is ever on both sides, and the class mix of both sides stays close.
"""

from __future__ import annotations

import csv
import logging
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.datasets import ImageSet

logger = logging.getLogger(__name__)

MANIFEST_NAME = "split_manifest.csv"


@dataclass(frozen=True)
class Split:
    """Indices into an :class:`ImageSet` for each side, and how they were drawn."""

    train: tuple[int, ...]
    val: tuple[int, ...]
    seed: int
    val_fraction: float


def _groups(images: ImageSet) -> list[int]:
    """Group id per sample: connected components over shared patient id or shared sha256."""
    parent = list(range(len(images.samples)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[str, int] = {}
    for i, sample in enumerate(images.samples):
        for key in (f"p:{sample.patient_id}", f"h:{sample.sha256}"):
            if key == "h:":  # no content hash (an image listed but not on disk): group by patient only
                continue
            if key in first:
                a, b = find(i), find(first[key])
                if a != b:
                    parent[max(a, b)] = min(a, b)
            else:
                first[key] = i
    return [find(i) for i in range(len(images.samples))]


def patient_split(images: ImageSet, val_fraction: float = 0.15, seed: int = 0) -> Split:
    """Split ``images`` into train and validation by patient (and duplicate) groups.

    Raises
    ------
    ValueError
        When ``val_fraction`` is not in (0, 1) or there are fewer than two groups.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    group_of = _groups(images)
    members: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(group_of):
        members[g].append(i)
    if len(members) < 2:
        raise ValueError(f"need at least two patients to split, got {len(members)}")
    strata: dict[tuple[int, ...], list[int]] = defaultdict(list)
    rarest = _rarity_order(images)
    for g, idx in members.items():
        if rarest is None:
            stratum = Counter(images.samples[i].labels for i in idx).most_common(1)[0][0]
        else:
            carried = {j for i in idx for j, v in enumerate(images.samples[i].labels) if v}
            stratum = (min((rarest[j] for j in carried), default=len(rarest)),)
        strata[stratum].append(g)
    rng = np.random.default_rng(seed)
    val: list[int] = []
    for stratum in sorted(strata):
        groups = sorted(strata[stratum])
        order = rng.permutation(len(groups))
        want = val_fraction * sum(len(members[g]) for g in groups)
        taken = 0
        for k in order:
            g = groups[int(k)]
            if taken >= want:
                break
            val.extend(members[g])
            taken += len(members[g])
    val_set = set(val)
    if not val_set or len(val_set) == len(images.samples):
        raise ValueError("the split left one side empty; use more data or another val_fraction")
    train = tuple(i for i in range(len(images.samples)) if i not in val_set)
    split = Split(train=train, val=tuple(sorted(val_set)), seed=seed, val_fraction=val_fraction)
    check_disjoint(images, split)
    logger.info("patient-wise split (seed %d): %d train, %d validation images from %d groups",
                seed, len(split.train), len(split.val), len(members))
    return split


def _rarity_order(images: ImageSet) -> list[int] | None:
    """Rank of each target from the rarest (0) up, for multi-target sets; ``None`` for one target."""
    if len(images.targets) < 2:
        return None
    counts = images.labels().sum(axis=0)
    order = np.argsort(counts, kind="stable")
    rank = [0] * len(order)
    for r, j in enumerate(order):
        rank[int(j)] = r
    return rank


def check_disjoint(images: ImageSet, split: Split) -> None:
    """Raise ValueError when a patient or a byte-identical image is on both sides."""
    for what in ("patient_id", "sha256"):
        train = {getattr(images.samples[i], what) for i in split.train}
        val = {getattr(images.samples[i], what) for i in split.val}
        both = (train & val) - {""}
        if both:
            raise ValueError(f"{len(both)} {what} values are on both sides of the split, e.g. {sorted(both)[:3]}")


def write_manifest(path: Path, images: ImageSet, split: Split, extra: Sequence[tuple[str, ImageSet]] = ()) -> None:
    """Write one CSV row per image: side, file (relative to the data root), patient, sha256, labels.

    ``extra`` adds whole sets under their own side name (e.g. ``("test", test_set)``).
    """
    side = {i: "train" for i in split.train} | {i: "val" for i in split.val}
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["split", "file", "patient_id", "sha256", *images.targets])
        for i, sample in enumerate(images.samples):
            if i in side:
                writer.writerow([side[i], images.relative(sample), sample.patient_id, sample.sha256, *sample.labels])
        for name, other in extra:
            for sample in other.samples:
                writer.writerow([name, other.relative(sample), sample.patient_id, sample.sha256, *sample.labels])


def read_manifest(path: Path) -> list[dict[str, str]]:
    """The rows of a manifest written by :func:`write_manifest`."""
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def split_from_manifest(images: ImageSet, path: Path) -> Split:
    """Rebuild a split from a manifest (by relative file name), e.g. to evaluate on a bundle's validation side.

    Raises
    ------
    ValueError
        When a file of the manifest is not in ``images`` or its content changed (sha256).
    """
    index = {images.relative(s): (i, s.sha256) for i, s in enumerate(images.samples)}
    train: list[int] = []
    val: list[int] = []
    for row in read_manifest(path):
        if row["split"] not in ("train", "val"):
            continue
        if row["file"] not in index:
            raise ValueError(f"manifest file {row['file']} is not under {images.root}")
        i, digest = index[row["file"]]
        if digest != row["sha256"]:
            raise ValueError(f"{row['file']} changed since the manifest was written (sha256 differs)")
        (train if row["split"] == "train" else val).append(i)
    return Split(train=tuple(sorted(train)), val=tuple(sorted(val)), seed=-1, val_fraction=float("nan"))
