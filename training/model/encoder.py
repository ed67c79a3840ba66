"""ResNet encoder (torchvision) that returns the feature maps of every stage.

Random initialisation by default. A local torchvision-format state-dict file can be given for
pretrained weights; nothing is ever downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision import models

_BUILDERS = {
    "resnet18": (models.resnet18, (64, 64, 128, 256, 512)),
    "resnet34": (models.resnet34, (64, 64, 128, 256, 512)),
    "resnet50": (models.resnet50, (64, 256, 512, 1024, 2048)),
}


class ResNetEncoder(nn.Module):
    """Five feature maps at strides 2, 4, 8, 16 and 32 (stem, layer1..layer4)."""

    def __init__(self, name: str = "resnet34", weights_path: str | Path | None = None) -> None:
        super().__init__()
        if name not in _BUILDERS:
            raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(_BUILDERS)}")
        builder, self.out_channels = _BUILDERS[name]
        net = builder(weights=None)
        if weights_path is not None:
            load_local_weights(net, weights_path)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu)
        self.pool = net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        f0 = self.stem(x)
        f1 = self.layer1(self.pool(f0))
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        f4 = self.layer4(f3)
        return [f0, f1, f2, f3, f4]


def load_local_weights(net: nn.Module, path: str | Path) -> None:
    """Load a torchvision ResNet state dict from a local file (the ``fc`` layer is ignored)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"pretrained weights file not found: {path}; set [model] pretrained_weights to a local "
            "torchvision ResNet .pth file, or leave it empty for random initialisation"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise ValueError(
            f"{path}: does not match the backbone ({str(exc).splitlines()[1].strip()}); "
            "use weights of the same ResNet depth as [model] backbone"
        ) from None
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise ValueError(
            f"{path}: does not match the backbone (missing {missing[:5]}, unexpected {unexpected[:5]}); "
            "use weights of the same ResNet depth as [model] backbone"
        )
