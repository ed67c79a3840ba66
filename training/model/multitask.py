"""The multi-task network: ResNet encoder -> U-Net decoder -> lesion head; DR and DME heads on the encoder."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple, cast

import torch
from torch import nn

from ..labels import DME_GRADES, DR_GRADES, LESION_CODES, LESIONS  # noqa: F401 - re-exported
from .decoder import UNetDecoder
from .encoder import ResNetEncoder
from .heads import EVIDENCE_STATS, ClassificationHead, EvidenceHead, SegmentationHead, lesion_evidence

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
    # What the DR and DME heads read: "features" (the encoder's pooled last stage; models before v2) or
    # "features+lesions" (avg + max pooled features and the lesion head's evidence, see heads.EvidenceHead).
    grade_inputs: str = "features"
    head_hidden: int = 256  # hidden units of the DR/DME heads' MLP

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
        channels = self.encoder.out_channels[-1]
        self.dr_head: nn.Module
        self.dme_head: nn.Module
        if config.grade_inputs == "features":
            self.dr_head = ClassificationHead(channels, config.num_dr_classes, config.dropout, config.head_hidden)
            self.dme_head = ClassificationHead(channels, config.num_dme_classes, config.dropout, config.head_hidden)
        elif config.grade_inputs == "features+lesions":
            evidence = len(config.lesions) * len(EVIDENCE_STATS)
            self.dr_head = EvidenceHead(channels, evidence, config.num_dr_classes, config.dropout, config.head_hidden)
            self.dme_head = EvidenceHead(channels, evidence, config.num_dme_classes, config.dropout, config.head_hidden)
        else:
            raise ValueError(f"model_config grade_inputs must be 'features' or 'features+lesions', got {config.grade_inputs!r}")

    def trunk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder + decoder + lesion head: (last-stage features, lesion logits)."""
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[-1] % 32 or x.shape[-2] % 32:
            raise ValueError(f"expected an (N, 3, H, W) batch with H and W multiples of 32, got {tuple(x.shape)}")
        feats = self.encoder(x)
        return feats[-1], self.seg_head(self.decoder(feats))

    def head_inputs(self, features: torch.Tensor, seg_logits: torch.Tensor) -> torch.Tensor | None:
        """The vector the evidence heads classify (None for pooled-feature heads, which pool themselves)."""
        if self.config.grade_inputs == "features":
            return None
        return EvidenceHead.pooled(features, lesion_evidence(seg_logits))

    def forward(self, x: torch.Tensor) -> MultiTaskOutput:
        features, seg = self.trunk(x)
        # The grade heads always run in float32, also when the trunk runs under half-precision autocast: their
        # batch norm divides by the training set's spread of each input, and the lesion evidence (log of tiny
        # lesion areas) has a narrow one, so bfloat16's rounding of the inputs became several standard
        # deviations (measured: P(DR 4) 0.0004 in float32, 0.36 in bfloat16). The heads cost ~1 % of the pass.
        with torch.autocast(device_type=x.device.type, enabled=False):
            head_features = features.float()
            vector = self.head_inputs(head_features, seg.float())
            if vector is None:
                return MultiTaskOutput(self.dr_head(head_features), self.dme_head(head_features), seg, features)
            dr_head, dme_head = cast(EvidenceHead, self.dr_head), cast(EvidenceHead, self.dme_head)  # grade_inputs says so
            return MultiTaskOutput(dr_head.classify(vector), dme_head.classify(vector), seg, features)


def build_model(config: ModelConfig, weights_path: str | Path | None = None) -> MultiTaskNet:
    return MultiTaskNet(config, weights_path)
