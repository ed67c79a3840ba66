"""Small head modules: segmentation (per-pixel logits) and classification (per-image logits)."""

from __future__ import annotations

import torch
from torch import nn


class SegmentationHead(nn.Conv2d):
    def __init__(self, in_channels: int, classes: int) -> None:
        super().__init__(in_channels, classes, kernel_size=3, padding=1)


class ClassificationHead(nn.Module):
    """Global average pool -> dropout -> linear. Input: the encoder's last feature map."""

    def __init__(self, in_channels: int, classes: int, dropout: float = 0.2, hidden: int = 256) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.mlp = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(in_channels, hidden), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(hidden, classes),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.mlp(self.pool(features))
        return logits
