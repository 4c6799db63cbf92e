"""Patient-wise splits: no patient and no duplicate image on both sides, reproducible from the seed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from training.datasets import ImageSet, Sample, scan
from training.splits import (
    Split,
    check_disjoint,
    patient_split,
    read_manifest,
    split_from_manifest,
    write_manifest,
)
from training.synthetic import write_kermany


def _many_patients(n_patients: int = 60, seed: int = 0) -> ImageSet:
    """In-memory samples: 1-4 images per patient, some duplicates across patients."""
    rng = np.random.default_rng(seed)
    samples = []
    for p in range(n_patients):
        label = int(p % 3 != 0)
        for k in range(int(rng.integers(1, 5))):
            samples.append(Sample(Path(f"/d/p{p}_{k}.jpeg"), (label,), f"person{p}", f"h{p}-{k}"))
    # byte-identical copies under other patients' names
    samples.append(Sample(Path("/d/copy1.jpeg"), (1,), "person1001", "h1-0"))
    samples.append(Sample(Path("/d/copy2.jpeg"), (1,), "person1002", "h1-0"))
    samples.append(Sample(Path("/d/copy3.jpeg"), (0,), "person1003", "h3-0"))
    return ImageSet(Path("/d"), "kermany", "train", ("Pneumonia",), tuple(samples))


@pytest.mark.parametrize("seed", [0, 1, 7, 123])
def test_no_patient_and_no_duplicate_on_both_sides(seed: int) -> None:
    images = _many_patients()
    split = patient_split(images, val_fraction=0.2, seed=seed)
    train_patients = {images.samples[i].patient_id for i in split.train}
    val_patients = {images.samples[i].patient_id for i in split.val}
    assert not train_patients & val_patients
    train_hashes = {images.samples[i].sha256 for i in split.train}
    val_hashes = {images.samples[i].sha256 for i in split.val}
    assert not train_hashes & val_hashes
    assert sorted(split.train + split.val) == list(range(len(images.samples)))
    # The duplicate's chain keeps person1, person1001 and person1002 together.
    side = {i: "val" if i in split.val else "train" for i in range(len(images.samples))}
    chain = [i for i, s in enumerate(images.samples) if s.sha256 == "h1-0" or s.patient_id == "person1"]
    assert len({side[i] for i in chain}) == 1


def test_split_is_reproducible_and_stratified() -> None:
    images = _many_patients()
    a = patient_split(images, 0.25, seed=3)
    assert a == patient_split(images, 0.25, seed=3)
    assert a != patient_split(images, 0.25, seed=4)
    labels = images.labels()[:, 0]
    assert 0.15 < len(a.val) / len(images.samples) < 0.4
    assert abs(labels[list(a.val)].mean() - labels.mean()) < 0.2


def test_check_disjoint_catches_leaks() -> None:
    images = _many_patients()
    split = patient_split(images, 0.2, seed=0)
    leaky = Split(train=split.train + (split.val[0],), val=split.val, seed=0, val_fraction=0.2)
    with pytest.raises(ValueError, match="on both sides"):
        check_disjoint(images, leaky)


def test_bad_fraction() -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        patient_split(_many_patients(), 1.0)


def test_manifest_round_trip(tmp_path: Path) -> None:
    write_kermany(tmp_path / "data", per_class=8)
    images = scan(tmp_path / "data")
    split = patient_split(images, 0.3, seed=5)
    write_manifest(tmp_path / "m.csv", images, split)
    rows = read_manifest(tmp_path / "m.csv")
    assert len(rows) == len(images.samples)
    assert {r["split"] for r in rows} == {"train", "val"}
    assert rows[0]["file"].startswith("train/")
    again = split_from_manifest(images, tmp_path / "m.csv")
    assert (again.train, again.val) == (split.train, split.val)
