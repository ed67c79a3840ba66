"""The multi-task network: ResNet encoder -> U-Net decoder -> lesion head; DR and DME heads on the encoder."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from ..labels import DME_GRADES, DR_GRADES, LESION_CODES, LESIONS  # noqa: F401 - re-exported
from .decoder import UNetDecoder
from .encoder import ResNetEncoder
from .heads import ClassificationHead, SegmentationHead

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the network; stored inside every checkpoint."""

    backbone: str = "resnet34"
    image_size: int = 512
    decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16)
    dropout: float = 0.2
    num_dr_classes: int = 5
    num_dme_classes: int = 3
    lesions: tuple[str, ...] = LESIONS
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    contrast: str = "none"  # input preprocessing before normalisation: "none" | "local-mean"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"model_config has unknown keys {sorted(unknown)}; is the checkpoint from a newer version?")
        values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**values)


class MultiTaskOutput(NamedTuple):
    dr_logits: torch.Tensor  # (N, 5)
    dme_logits: torch.Tensor  # (N, 3)
    seg_logits: torch.Tensor  # (N, 5, H, W)
    features: torch.Tensor  # (N, C, H/32, W/32): the encoder's last stage, the Grad-CAM layer


class MultiTaskNet(nn.Module):
    def __init__(self, config: ModelConfig, weights_path: str | Path | None = None) -> None:
        super().__init__()
        self.config = config
        self.encoder = ResNetEncoder(config.backbone, weights_path)
        self.decoder = UNetDecoder(self.encoder.out_channels, tuple(config.decoder_channels))
        self.seg_head = SegmentationHead(self.decoder.out_channels, len(config.lesions))
        self.dr_head = ClassificationHead(self.encoder.out_channels[-1], config.num_dr_classes, config.dropout)
        self.dme_head = ClassificationHead(self.encoder.out_channels[-1], config.num_dme_classes, config.dropout)

    def forward(self, x: torch.Tensor) -> MultiTaskOutput:
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[-1] % 32 or x.shape[-2] % 32:
            raise ValueError(f"expected an (N, 3, H, W) batch with H and W multiples of 32, got {tuple(x.shape)}")
        feats = self.encoder(x)
        seg = self.seg_head(self.decoder(feats))
        return MultiTaskOutput(self.dr_head(feats[-1]), self.dme_head(feats[-1]), seg, feats[-1])


def build_model(config: ModelConfig, weights_path: str | Path | None = None) -> MultiTaskNet:
    return MultiTaskNet(config, weights_path)
