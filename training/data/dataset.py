"""Torch dataset over records: cached preprocessing, then an albumentations transform on image + masks."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset

from training.data.cache import NUM_LESIONS, load_record
from training.data.records import Record
from training.data.transforms import eval_transforms
from training.model import DR_GRADES


class FundusDataset(Dataset[dict[str, Any]]):
    """Items are dicts with the same keys for every source, so the default collate works:

    ``image`` float (3, S, S) normalised; ``masks`` float (5, S, S) {0, 1} (zeros when the image
    has no annotation); ``has_masks`` bool tensor (use it to mask the segmentation loss); ``dr``
    long (-1 unknown); ``dme`` long (-1 unknown, 0/1/2, 3 = present with unknown grade);
    ``index`` int (position in ``records``).
    """

    def __init__(
        self,
        records: Sequence[Record],
        size: int,
        cache_dir: str | Path,
        transform: A.Compose | None = None,
    ) -> None:
        self.records = list(records)
        self.size = size
        self.cache_dir = Path(cache_dir)
        self.transform = transform if transform is not None else eval_transforms(size)

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int, seed: int) -> None:
        """Reseed the augmentation for ``epoch`` so a resumed run draws exactly what an uninterrupted one would
        (albumentations keeps its own random state, which a checkpoint does not capture)."""
        if hasattr(self.transform, "set_random_seed"):
            self.transform.set_random_seed(seed * 100_003 + epoch)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        cached = load_record(record, self.size, self.cache_dir)
        masks = cached.masks if cached.masks is not None else np.zeros((*cached.image.shape[:2], NUM_LESIONS), np.uint8)
        out = self.transform(image=cached.image, mask=masks)
        image, mask = out["image"], out["mask"]
        if not isinstance(mask, torch.Tensor):  # a transform without ToTensorV2
            mask = torch.from_numpy(np.ascontiguousarray(mask)).permute(2, 0, 1)
        return {
            "image": image.float(),
            "masks": mask.float(),
            "dr": torch.tensor(record.dr_grade, dtype=torch.long),
            "dme": torch.tensor(record.dme_grade, dtype=torch.long),
            "has_masks": torch.tensor(record.has_masks, dtype=torch.bool),
            "index": index,
        }


def class_counts(records: Sequence[Record], num_classes: int = len(DR_GRADES)) -> np.ndarray:
    """Number of records per DR grade (unknown grades ignored), e.g. for inverse-frequency weights."""
    counts = np.zeros(num_classes, dtype=np.int64)
    for rec in records:
        if rec.dr_grade == -1:
            continue
        if not 0 <= rec.dr_grade < num_classes:
            raise ValueError(f"{rec.image}: DR grade {rec.dr_grade} outside 0..{num_classes - 1}")
        counts[rec.dr_grade] += 1
    return counts
