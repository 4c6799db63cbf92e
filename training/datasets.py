"""Training data: three folder layouts, one preprocessing path, one cache.

Layouts
-------
``kermany``
    ``ROOT/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg`` (Kermany et al. 2018). ``ROOT`` may also be one split
    folder that holds ``NORMAL/`` and ``PNEUMONIA/``. Target: ``Pneumonia``.
``nih``
    NIH ChestX-ray14: ``Data_Entry_2017*.csv`` (in ``ROOT`` or ``ROOT/metadata``), the official split lists
    ``train_val_list.txt`` / ``test_list.txt`` beside it, and PNG images anywhere under ``ROOT`` (``images/``,
    ``images_001/images/`` ...). Only images present on disk are used. Targets: the 14 findings + No Finding.
``dicom``
    A hospital's own studies: DICOM files under ``ROOT`` and ``ROOT/labels.csv`` with a ``file`` column
    (path relative to ``ROOT``), an optional ``patient_id`` column (default: the file's PatientID), and either
    one column per target (0/1) or a ``label`` column (0/1, or ``NORMAL``/``PNEUMONIA`` for the binary task).

Every image, JPEG, PNG or DICOM, goes through :func:`xraybatch.preprocess.model_input_8bit` (8-bit pictures) or
:func:`xraybatch.preprocess.model_input` (DICOM, decoded by :mod:`xraybatch.ingest` as in the pipeline), with the
bundle's :class:`~xraybatch.models.registry.ModelPreprocess`: exactly the functions inference runs. :func:`load_inputs` caches the resulting float32 model inputs in ``cache_dir`` as one
``.npy`` per (file list, preprocessing settings, size), so epochs never decode an image twice.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from xraybatch.domain import XrayImage
from xraybatch.models.findings import BINARY_TARGETS, NIH_TARGETS, NO_FINDING
from xraybatch.models.registry import ModelPreprocess
from xraybatch.preprocess import model_input as dicom_model_input
from xraybatch.preprocess import model_input_8bit

logger = logging.getLogger(__name__)

LAYOUTS = ("kermany", "nih", "dicom")
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
DICOM_SUFFIXES = (".dcm", ".dicom", "")
KERMANY_CLASSES = {"NORMAL": 0, "PNEUMONIA": 1}
CACHE_VERSION = 4  # bump when the way inputs are produced changes, to invalidate old caches

_PERSON = re.compile(r"^person(\d+)_", re.IGNORECASE)
_IM = re.compile(r"^(?:NORMAL2-)?IM-(\d+)-", re.IGNORECASE)


@dataclass(frozen=True)
class Sample:
    """One training image: where it is, its labels (aligned with the set's targets), patient and content hash."""

    path: Path
    labels: tuple[int, ...]
    patient_id: str
    sha256: str  # of the file's bytes: byte-identical duplicates share it


@dataclass(frozen=True)
class ImageSet:
    """The samples of one layout and split, in a fixed (sorted) order."""

    root: Path
    layout: str
    split: str
    targets: tuple[str, ...]
    samples: tuple[Sample, ...]

    def labels(self) -> np.ndarray:
        """(N, targets) int array."""
        return np.array([s.labels for s in self.samples], dtype=np.int64).reshape(len(self.samples), -1)

    def relative(self, sample: Sample) -> str:
        """The sample's path relative to the data root, with forward slashes (for manifests)."""
        try:
            return sample.path.relative_to(self.root).as_posix()
        except ValueError:
            return sample.path.as_posix()

    def subset(self, indices: Sequence[int]) -> ImageSet:
        """A new set with the samples at ``indices``."""
        return ImageSet(self.root, self.layout, self.split, self.targets,
                        tuple(self.samples[i] for i in indices))


def kermany_patient_id(name: str) -> str:
    """The patient of a Kermany file name.

    ``person1234_bacteria_567.jpeg`` -> ``person1234``; ``IM-0115-0001.jpeg`` and ``NORMAL2-IM-0115-0001.jpeg``
    -> ``IM-0115`` (the NORMAL2 prefix marks a second batch; sharing the number groups them together, which can
    only make a split stricter). Names that match neither pattern are their own patient.
    """
    stem = Path(name).name
    if match := _PERSON.match(stem):
        return f"person{int(match.group(1))}"
    if match := _IM.match(stem):
        return f"IM-{match.group(1)}"
    return f"file:{Path(stem).stem}"


def detect_layout(root: Path) -> str:
    """Guess the layout of ``root``.

    Raises
    ------
    ValueError
        When ``root`` matches none of :data:`LAYOUTS`.
    """
    root = Path(root)
    if (root / "labels.csv").is_file():
        return "dicom"
    if _find_nih_table(root) is not None:
        return "nih"
    if any((root / s / c).is_dir() for s in ("train", "val", "test", ".") for c in KERMANY_CLASSES):
        return "kermany"
    raise ValueError(
        f"cannot tell the layout of {root}: expected train/NORMAL|PNEUMONIA (Kermany), Data_Entry_2017*.csv "
        "(NIH ChestX-ray14) or labels.csv with DICOM files; pass --layout to say which"
    )


def scan(root: Path | str, layout: str = "auto", split: str = "train") -> ImageSet:
    """Find the labelled images of ``root`` in ``layout`` (``auto`` detects it).

    ``split`` selects ``train``/``val``/``test`` for Kermany, ``train_val``/``test`` for NIH and is ignored for
    the DICOM layout.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"data directory {root} does not exist")
    layout = detect_layout(root) if layout == "auto" else layout
    if layout == "kermany":
        return scan_kermany(root, split)
    if layout == "nih":
        return scan_nih(root, "train_val" if split == "train" else split)
    if layout == "dicom":
        return scan_dicom_folder(root)
    raise ValueError(f"layout {layout!r} is not one of {LAYOUTS} or 'auto'")


def scan_kermany(root: Path, split: str = "train") -> ImageSet:
    """The Kermany layout: ``root/split/{NORMAL,PNEUMONIA}/*`` (or ``root/{NORMAL,PNEUMONIA}``)."""
    base = root / split if (root / split).is_dir() else root
    samples: list[Sample] = []
    for class_name, label in KERMANY_CLASSES.items():
        folder = base / class_name
        if not folder.is_dir():
            raise ValueError(f"{folder} is missing: a Kermany split needs NORMAL/ and PNEUMONIA/ folders")
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith("."):
                samples.append(Sample(path, (label,), kermany_patient_id(path.name), _sha256(path)))
    if not samples:
        raise ValueError(f"no .jpeg/.jpg/.png images under {base}/NORMAL and {base}/PNEUMONIA")
    logger.info("kermany %s: %d images, %d patients", split, len(samples), len({s.patient_id for s in samples}))
    return ImageSet(root, "kermany", split, BINARY_TARGETS, tuple(samples))


def _find_nih_table(root: Path) -> Path | None:
    for folder in (root, root / "metadata"):
        found = sorted(folder.glob("Data_Entry_2017*.csv")) if folder.is_dir() else []
        if found:
            return found[-1]
    return None


def scan_nih(root: Path, split: str = "train_val", targets: tuple[str, ...] = NIH_TARGETS,
             on_disk_only: bool = True) -> ImageSet:
    """NIH ChestX-ray14: labels from ``Data_Entry_2017*.csv``, the official ``<split>_list.txt``, images on disk.

    A target list without ``No Finding`` simply omits that column; an image whose findings are all outside
    ``targets`` gets all zeros. With ``on_disk_only=False`` every listed row is kept: absent images get the
    path ``ROOT/images/<name>`` and an empty sha256 (for checking splits on the full table without the images).
    """
    table = _find_nih_table(root)
    if table is None:
        raise ValueError(f"no Data_Entry_2017*.csv in {root} or {root / 'metadata'}")
    if split not in ("train_val", "test", "all"):
        raise ValueError(f"NIH split must be 'train_val', 'test' or 'all', got {split!r}")
    wanted: set[str] | None = None
    if split != "all":
        list_file = table.parent / f"{split}_list.txt"
        if not list_file.is_file():
            raise ValueError(f"official split list {list_file} is missing")
        wanted = {line.strip() for line in list_file.read_text().splitlines() if line.strip()}
    on_disk: dict[str, Path] = {}
    for path in sorted(root.rglob("*.png")):
        on_disk.setdefault(path.name, path)  # first folder in sorted order wins (images/ before images_64/)
    samples: list[Sample] = []
    missing = 0
    with open(table, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            name = row["Image Index"]
            if wanted is not None and name not in wanted:
                continue
            found = on_disk.get(name)
            if found is None:
                missing += 1
                if on_disk_only:
                    continue
            labels = nih_labels(row["Finding Labels"], targets)
            samples.append(Sample(found or root / "images" / name, labels, f"nih:{int(row['Patient ID'])}",
                                  _sha256(found) if found else ""))
    if not samples:
        raise ValueError(f"none of the NIH {split} images listed in {table.name} is under {root}")
    logger.info("nih %s: %d images on disk (%d listed but absent)", split, len(samples), missing)
    if NO_FINDING in targets and len(targets) == 1:
        raise ValueError("targets must include at least one finding besides 'No Finding'")
    samples.sort(key=lambda s: s.path.name)
    return ImageSet(root, "nih", split, tuple(targets), tuple(samples))


def nih_labels(finding_labels: str, targets: tuple[str, ...] = NIH_TARGETS) -> tuple[int, ...]:
    """0/1 per target from an NIH ``Finding Labels`` cell (``|``-separated, e.g. ``Effusion|Infiltration``).

    Raises
    ------
    ValueError
        For a label that is not an NIH finding (a misspelt or foreign table), or "No Finding" beside a finding.
    """
    findings = {f.strip() for f in finding_labels.split("|") if f.strip()}
    unknown = findings - set(NIH_TARGETS)
    if unknown or not findings:
        raise ValueError(f"NIH Finding Labels {finding_labels!r}: unknown labels {sorted(unknown)}; "
                         f"expected '|'-separated names of {list(NIH_TARGETS)}")
    if NO_FINDING in findings and len(findings) > 1:
        raise ValueError(f"NIH Finding Labels {finding_labels!r} has 'No Finding' beside findings")
    return tuple(int(t in findings) for t in targets)


def scan_dicom_folder(root: Path, targets: tuple[str, ...] = BINARY_TARGETS, labels_csv: str = "labels.csv") -> ImageSet:
    """DICOM files listed in ``root/labels.csv`` (see the module docstring for its columns)."""
    import pydicom

    table = root / labels_csv
    if not table.is_file():
        raise ValueError(f"{table} is missing: the DICOM layout needs a CSV with a 'file' column and labels")
    samples: list[Sample] = []
    with open(table, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = set(reader.fieldnames or ())
        if "file" not in columns:
            raise ValueError(f"{table} needs a 'file' column, has {sorted(columns)}")
        per_target = all(t in columns for t in targets)
        if not per_target and "label" not in columns:
            raise ValueError(f"{table} needs a 'label' column or one column per target {list(targets)}")
        for line, row in enumerate(reader, start=2):
            path = root / row["file"]
            if not path.is_file():
                raise ValueError(f"{table}:{line}: {path} does not exist")
            if per_target:
                labels = tuple(_as_label(row[t], f"{table}:{line}") for t in targets)
            else:
                if len(targets) != 1:
                    raise ValueError(f"{table}: a single 'label' column only works for one target")
                labels = (_as_label(row["label"], f"{table}:{line}"),)
            patient = (row.get("patient_id") or "").strip()
            if not patient:
                patient = str(pydicom.dcmread(path, stop_before_pixels=True).get("PatientID", "") or "")
            if not patient:
                raise ValueError(f"{table}:{line}: no patient_id and the file has no PatientID; patient-wise "
                                 "splits need one")
            samples.append(Sample(path, labels, f"dicom:{patient}", _sha256(path)))
    if not samples:
        raise ValueError(f"{table} lists no files")
    samples.sort(key=lambda s: s.path.as_posix())
    return ImageSet(root, "dicom", "all", tuple(targets), tuple(samples))


def _as_label(value: str, where: str) -> int:
    text = value.strip().upper()
    if text in ("1", "1.0", "TRUE", "PNEUMONIA", "POSITIVE"):
        return 1
    if text in ("0", "0.0", "FALSE", "NORMAL", "NEGATIVE"):
        return 0
    raise ValueError(f"{where}: label {value!r} is not 0/1 (or NORMAL/PNEUMONIA)")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def is_dicom(path: Path) -> bool:
    """A file is DICOM when it has the ``DICM`` preamble marker (suffix-independent)."""
    with open(path, "rb") as fh:
        head = fh.read(132)
    return len(head) == 132 and head[128:] == b"DICM"


def model_input(path: Path, cfg: ModelPreprocess, size: tuple[int, int]) -> np.ndarray:
    """One file -> the float32 (H, W) model input, through the inference preprocessing functions."""
    if is_dicom(path):
        return dicom_model_input(_read_dicom(path), cfg, size).pixels
    from PIL import Image

    with Image.open(path) as img:
        pixels = np.asarray(img.convert("L"))
    return model_input_8bit(pixels, cfg, size).pixels


def _read_dicom(path: Path) -> XrayImage:
    """Decode a DICOM file exactly as the pipeline does (:func:`xraybatch.ingest.read_header` and ``read``)."""
    from xraybatch import ingest
    from xraybatch.errors import InvalidInputError
    from xraybatch.settings import IngestConfig

    try:
        header, _ = ingest.read_header(path, IngestConfig())
        return ingest.read(header)
    except InvalidInputError as err:
        raise ValueError(f"{path}: {err}") from err


def jpeg_quality_of(images: ImageSet, size: tuple[int, int], sample: int = 64) -> int:
    """The JPEG quality the training pictures were stored at, at the model's ``size`` (height, width); 0 if none.

    Up to ``sample`` pictures, spread evenly over the set, are opened (headers only). When every one is a JPEG
    file of exactly ``size`` whose luminance quantisation table is the one Pillow writes at some quality, and
    all share that quality, it is returned; otherwise (PNG, DICOM, other sizes, mixed or unknown tables) 0.
    """
    from PIL import Image

    if not images.samples:
        return 0
    step = max(1, len(images.samples) // sample)
    found: set[int] = set()
    for item in images.samples[::step][:sample]:
        try:
            with Image.open(item.path) as picture:
                if picture.format != "JPEG" or picture.size != (size[1], size[0]):
                    return 0
                table = tuple(picture.quantization[0])  # type: ignore[attr-defined]  # JpegImageFile
        except (OSError, KeyError, ValueError):  # not a picture Pillow reads (a DICOM file), or no tables
            return 0
        quality = _pillow_quality(table)
        if quality is None:
            return 0
        found.add(quality)
    return found.pop() if len(found) == 1 else 0


_PILLOW_TABLES: dict[tuple[int, ...], int] = {}


def _pillow_quality(table: tuple[int, ...]) -> int | None:
    """The Pillow JPEG quality (1-100) whose luminance quantisation table is ``table``, or None."""
    import io

    from PIL import Image

    if not _PILLOW_TABLES:
        tile = Image.new("L", (8, 8), 128)
        for quality in range(100, 0, -1):  # a table shared by several qualities maps to the lowest of them
            buffer = io.BytesIO()
            tile.save(buffer, format="JPEG", quality=quality)
            buffer.seek(0)
            with Image.open(buffer) as written:
                _PILLOW_TABLES[tuple(written.quantization[0])] = quality  # type: ignore[attr-defined]
    return _PILLOW_TABLES.get(table)


def cache_key(images: ImageSet, cfg: ModelPreprocess, size: tuple[int, int]) -> str:
    """A hash of the file contents, the preprocessing settings and the size: names one cache file."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"v": CACHE_VERSION, "pre": asdict(cfg), "size": list(size)}).encode())
    for sample in images.samples:
        digest.update(sample.sha256.encode())
    return digest.hexdigest()[:20]


def load_inputs(
    images: ImageSet,
    cfg: ModelPreprocess,
    size: tuple[int, int],
    cache_dir: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """The model inputs of every sample as one float32 (N, H, W) array, from ``cache_dir`` when present.

    ``progress(done, total)`` is called while decoding; nothing is decoded when the cache file exists.
    """
    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / f"inputs-{images.layout}-{size[0]}x{size[1]}-{cache_key(images, cfg, size)}.npy"
        if cache_file.is_file():
            arr = np.load(cache_file)
            if arr.shape == (len(images.samples), *size):
                logger.info("model inputs from cache %s", cache_file)
                return arr
            logger.warning("cache %s has shape %s, rebuilding", cache_file, arr.shape)
    out = np.empty((len(images.samples), *size), dtype=np.float32)
    for i, sample in enumerate(images.samples):
        out[i] = model_input(sample.path, cfg, size)
        if progress is not None:
            progress(i + 1, len(images.samples))
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp.npy")
        np.save(tmp, out)
        tmp.replace(cache_file)
        logger.info("cached %d model inputs in %s", len(out), cache_file)
    return out


class StreamedInputs:
    """Model inputs decoded on demand, for sets too large for :func:`load_inputs`' in-memory array.

    Indexes like that array: ``inputs[i]`` is one (H, W) float32 input, ``inputs[[i, j]]`` a stack. Training
    reads it through :func:`iter_batches`, which decodes in DataLoader worker processes.
    """

    def __init__(self, images: ImageSet, cfg: ModelPreprocess, size: tuple[int, int]) -> None:
        self.paths = [s.path for s in images.samples]
        self.cfg = cfg
        self.size = size
        self.shape = (len(self.paths), *size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int | Sequence[int] | np.ndarray) -> np.ndarray:
        if isinstance(index, (int, np.integer)):
            return model_input(self.paths[int(index)], self.cfg, self.size)
        return np.stack([model_input(self.paths[int(i)], self.cfg, self.size) for i in index])


def iter_batches(inputs: np.ndarray | StreamedInputs, batches: Sequence[Sequence[int] | np.ndarray],
                 workers: int = 0, pin_memory: bool = False,
                 transform: Callable[[int, np.ndarray], np.ndarray] | None = None,
                 ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(indices, pixels)`` per batch, in order.

    ``pixels`` are slices of the in-memory array or decoded streamed inputs, passed through
    ``transform(step, pixels)`` when one is given (training's re-encoding). With ``workers`` > 0, ``workers``
    DataLoader processes make the batches (decode and transform) ahead of the loop; the result is the same as
    in this process, as long as ``transform`` draws its randomness from ``step`` alone. Without a transform an
    in-memory array is sliced here (nothing to do in parallel)."""
    made = _Batches(inputs, batches, transform)
    if workers <= 0 or (isinstance(inputs, np.ndarray) and transform is None):
        for step, idx in enumerate(made.batches):
            yield idx, made[step]
        return
    from torch.utils.data import DataLoader

    loader: DataLoader[np.ndarray] = DataLoader(
        made, batch_size=None, num_workers=workers, pin_memory=pin_memory,  # type: ignore[arg-type]  # by protocol
        persistent_workers=False, prefetch_factor=4)
    for idx, pixels in zip(made.batches, loader, strict=True):
        yield idx, np.asarray(pixels)


class _Batches:
    """Map-style dataset of whole batches (item ``step`` = the pixels of ``batches[step]``), for
    :func:`iter_batches`' worker processes."""

    def __init__(self, inputs: np.ndarray | StreamedInputs, batches: Sequence[Sequence[int] | np.ndarray],
                 transform: Callable[[int, np.ndarray], np.ndarray] | None) -> None:
        self.inputs = inputs
        self.batches = [np.asarray(b, dtype=np.int64) for b in batches]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, step: int) -> np.ndarray:
        pixels = np.asarray(self.inputs[self.batches[step]])
        return self.transform(step, pixels) if self.transform is not None else pixels
