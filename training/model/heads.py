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


# Per lesion channel (MA, HE, EX, SE, OD): mean probability, log of it, the peak of the 8x8-averaged map and the
# share of pixels above 0.5. Named here so the checkpoint, the evaluation and the report speak of the same numbers.
EVIDENCE_STATS: tuple[str, ...] = ("mean", "log_mean", "peak8", "area50")


def lesion_evidence(seg_logits: torch.Tensor) -> torch.Tensor:
    """(N, L, H, W) lesion logits -> (N, L * 4) evidence: how much of each lesion the segmentation head sees.

    Why these: ICDR grades are defined by which lesions are present and how many; the means measure how
    much, the 8x8-window peak whether there is at least one confident spot (a single microaneurysm or
    haemorrhage moves an eye from grade 0 to 1), and log(mean) spreads the tiny areas of early disease.
    """
    probs = torch.sigmoid(seg_logits.float())
    mean = probs.mean(dim=(2, 3))
    window = max(1, min(8, probs.shape[-1]))
    peak = nn.functional.avg_pool2d(probs, window, stride=window).amax(dim=(2, 3))
    area = (probs > 0.5).float().mean(dim=(2, 3))
    return torch.cat([mean, torch.log(mean + 1e-4), peak, area], dim=1)


class EvidenceHead(nn.Module):
    """Average- and max-pooled encoder features joined with the lesion evidence -> batch norm -> MLP.

    The max pool keeps a small lesion's strongest response, which global averaging dilutes; the batch norm
    puts the 2 x C pooled features and the lesion evidence on one scale (its running statistics travel in
    the checkpoint, so the worker standardises exactly as training did).
    """

    def __init__(self, in_channels: int, evidence: int, classes: int, dropout: float = 0.2, hidden: int = 256) -> None:
        super().__init__()
        self.in_features = 2 * in_channels + evidence
        self.norm = nn.BatchNorm1d(self.in_features)
        self.mlp = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(self.in_features, hidden), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(hidden, classes),
        )

    @staticmethod
    def pooled(features: torch.Tensor, evidence: torch.Tensor) -> torch.Tensor:
        """The head's input vector: [avg pool, max pool, evidence] (also what the grading stage caches)."""
        return torch.cat([features.mean(dim=(2, 3)), features.amax(dim=(2, 3)), evidence.to(features.dtype)], dim=1)

    def classify(self, vector: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.mlp(self.norm(vector))
        return logits

    def forward(self, features: torch.Tensor, evidence: torch.Tensor) -> torch.Tensor:
        return self.classify(self.pooled(features, evidence))
