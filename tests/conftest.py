"""Shared fixtures: tiny model bundles in the real format, synthetic DICOM files, the shared data folder."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_file(relative: str) -> Path:
    """A file under ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"{path} is absent: the shared data folder is not next to this checkout")
    return path


def make_tiny_bundle(
    out: Path,
    *,
    name: str = "tiny-binary",
    task: str = "binary",
    targets: tuple[str, ...] = ("Pneumonia",),
    thresholds: dict[str, float] | None = None,
    size: int = 64,
    channels: int = 1,
    seed: int = 0,
    contrast: str = "equalise",
) -> Path:
    """A randomly initialised separable CNN saved as a real bundle (weights + model.json with sha256)."""
    import torch
    from safetensors.torch import save_file

    from xraybatch.models.nets import build_network
    from xraybatch.models.registry import ModelPreprocess, write_model_json

    torch.manual_seed(seed)
    args = {"widths": [8, 16, 32], "dropout": 0.0}
    net = build_network("separable_cnn", num_outputs=len(targets), in_channels=channels, **args).eval()
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out / "weights.safetensors"))
    write_model_json(
        out,
        {
            "name": name,
            "version": "0.0.1-test",
            "task": task,
            "architecture": "separable_cnn",
            "architecture_args": args,
            "targets": list(targets),
            "thresholds": thresholds or {t: 0.5 for t in targets},
            "input": {"size": [size, size], "channels": channels, "mean": [0.5] * channels, "std": [0.25] * channels},
            "preprocessing": ModelPreprocess(contrast=contrast).to_meta(),
            "weights": {"file": "weights.safetensors"},
            "provenance": {"note": "random weights for tests"},
        },
    )
    return out


@pytest.fixture
def tiny_bundle(tmp_path: Path) -> Path:
    return make_tiny_bundle(tmp_path / "bundles" / "tiny-binary")


@pytest.fixture
def tiny_bundles(tmp_path: Path) -> Path:
    """A folder with a tiny binary and a tiny 15-target multi-label bundle."""
    from xraybatch.models.findings import NIH_TARGETS

    root = tmp_path / "bundles"
    make_tiny_bundle(root / "tiny-binary")
    make_tiny_bundle(
        root / "tiny-multilabel", name="tiny-multilabel", task="multilabel", targets=NIH_TARGETS, channels=3,
        size=48, seed=1,
    )
    return root


@pytest.fixture
def dicom_factory(tmp_path: Path) -> Callable[..., Path]:
    """Write a synthetic DICOM file: ``dicom_factory("name.dcm", modality="DX", ...)``."""
    from tests.synth import write_dicom

    def make(name: str, **kwargs: object) -> Path:
        return write_dicom(tmp_path / "in" / name, **kwargs)  # type: ignore[arg-type]

    return make


@pytest.fixture(autouse=True)
def _restore_torch_state() -> Iterator[None]:
    """Training switches torch to deterministic algorithms and sets its thread count: undo both per test."""
    import torch

    deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    yield
    torch.use_deterministic_algorithms(deterministic)
    torch.set_num_threads(threads)
