"""Augmentation: seeded, in range, identity when off, flip only on request."""

from __future__ import annotations

import pytest
import torch

from training.transforms import AugmentConfig, augment


def _batch() -> torch.Tensor:
    x = torch.linspace(0, 1, 32).view(1, 1, 1, 32).expand(4, 1, 32, 32).clone()
    x[:, :, 8:16, 4:12] = 1.0
    return x


def test_augment_is_seeded_and_in_range() -> None:
    cfg = AugmentConfig()
    a = augment(_batch(), cfg, torch.Generator().manual_seed(1))
    b = augment(_batch(), cfg, torch.Generator().manual_seed(1))
    c = augment(_batch(), cfg, torch.Generator().manual_seed(2))
    assert a.shape == (4, 1, 32, 32)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert 0.0 <= a.min() and a.max() <= 1.0
    assert not torch.allclose(a[0], a[1])  # every image gets its own transform


def test_all_off_is_identity() -> None:
    cfg = AugmentConfig(rotation_deg=0, shift=0, zoom=0, brightness=0, contrast=0, hflip=False)
    x = _batch()
    assert torch.equal(augment(x, cfg, torch.Generator().manual_seed(0)), x)


def test_contrast_only_is_monotonic() -> None:
    cfg = AugmentConfig(rotation_deg=0, shift=0, zoom=0, brightness=0, contrast=0.5)
    x = _batch()
    out = augment(x, cfg, torch.Generator().manual_seed(0))
    for i in range(4):  # a per-image increasing map of the pixel values (no geometry change)
        order = torch.argsort(x[i].flatten(), stable=True)
        assert torch.all(torch.diff(out[i].flatten()[order]) >= -1e-6)
    assert not torch.equal(out, x)


def test_hflip_is_off_by_default_and_flips_when_on() -> None:
    assert AugmentConfig().hflip is False
    only_flip = AugmentConfig(rotation_deg=0, shift=0, zoom=0, brightness=0, contrast=0, hflip=True)
    x = _batch()
    out = augment(x, only_flip, torch.Generator().manual_seed(0))
    flipped = [torch.allclose(out[i], x[i].flip(-1), atol=1e-5) for i in range(4)]
    kept = [torch.allclose(out[i], x[i], atol=1e-5) for i in range(4)]
    assert all(f or k for f, k in zip(flipped, kept)) and any(flipped)


def test_bad_config() -> None:
    with pytest.raises(ValueError, match="rotation_deg"):
        AugmentConfig(rotation_deg=-1)
    with pytest.raises(ValueError, match="batch"):
        augment(torch.zeros(1, 8, 8), AugmentConfig(), torch.Generator())


def test_reencode_goes_through_the_inference_code_and_is_seeded() -> None:
    import numpy as np

    from training.transforms import ReencodeConfig, reencode_batch
    from xraybatch.preprocess import equalise

    rng = np.random.default_rng(0)
    pictures = np.stack([equalise(rng.integers(0, 256, (32, 32))) for _ in range(6)])
    cfg = ReencodeConfig(probability=1.0)
    a = reencode_batch(pictures, cfg, np.random.default_rng(7))
    b = reencode_batch(pictures, cfg, np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    assert a.shape == pictures.shape and a.dtype == np.float32 and 0 < a.min() and a.max() < 1
    assert np.abs(a - pictures).mean() > 1e-3  # the views do change (window clipping, blur, noise, JPEG)
    # bit depth, polarity and rescale alone: the equalised input of every encoding is the picture's own
    plain = ReencodeConfig(probability=1.0, gamma=0, clip=0, blur=0, sharpen=0, noise=0, jpeg=0)
    assert np.abs(reencode_batch(pictures, plain, np.random.default_rng(1)) - pictures).max() < 5e-3
    np.testing.assert_array_equal(reencode_batch(pictures, ReencodeConfig(probability=0.0), rng), pictures)
