"""Predictor: load the checkpoint once, grade batches of images, explain both heads from one forward."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.api import (
    apply_grader,
    calibrated_referable,
    eval_transforms,
    features_of,
    fundus_mask,
    lesion_evidence,
    load_model,
    resolve_device,
    uses_segmentation,
)
from training.common import LESION_CODES

from .explain import head_cams
from .report import grade_source, model_metrics_for_report


@dataclass
class ImagePrediction:
    dr_grade: int
    dr_probs: list[float]
    dme_grade: int
    dme_probs: list[float]
    referable_score: float
    referable: bool
    masks: np.ndarray  # (5, S, S) bool, LESION_CODES order
    lesion_areas: dict[str, float]  # fraction of the fundus field, per lesion code
    dr_cam: np.ndarray  # (S, S) float in [0, 1]
    dme_cam: np.ndarray


@dataclass
class PreparedBatch:
    """A batch ready for the forward pass (:meth:`Predictor.prepare`)."""

    images: list[np.ndarray]  # preprocessed RGB, as given
    tensor: torch.Tensor | None  # the eval preset applied, on the model's device; None when empty
    image_features: np.ndarray | None  # the grader's image measurements, when the checkpoint has a grader


def referable_probability(dr: np.ndarray, dme: np.ndarray, calibration: dict[str, Any] | None = None) -> np.ndarray:
    """P(referable) = 1 - P(DR <= 1) * P(no DME risk), through the checkpoint's calibration map when it has
    one: the same function the referral threshold was chosen with."""
    return calibrated_referable(dr, dme, calibration)


class Predictor:
    """Holds the model for the worker's lifetime; ``predict`` takes preprocessed RGB images."""

    def __init__(self, checkpoint: Path, device: str = "auto", threads: int = 2) -> None:
        torch.set_num_threads(threads)
        self.device = resolve_device(device)
        self.model, self.meta = load_model(checkpoint, self.device)
        self.size = self.model.config.image_size
        self.transform = eval_transforms(self.size, self.model.config.contrast)
        self.threshold = float(self.meta["thresholds"]["referable"])
        self.lesion_threshold = float(self.meta["thresholds"].get("lesion", 0.5))

    @property
    def version(self) -> str:
        return str(self.meta["model_version"])

    @property
    def kind(self) -> str:
        """'real' for a model trained and validated on real photos, 'synthetic' for a demo model."""
        return str(self.meta["provenance"]["kind"])

    def report_metrics(self) -> dict[str, float | str]:
        """The checkpoint's headline metrics, labelled for the report's model section."""
        return model_metrics_for_report(self.meta)

    @property
    def grade_source(self) -> str:
        """What produced the DR grade and DME risk, in words for the report."""
        return grade_source(self.meta)

    def to_tensor(self, images: list[np.ndarray]) -> torch.Tensor:
        return torch.stack([self.transform(image=im)["image"] for im in images]).to(self.device)

    def forward(self, batch: torch.Tensor) -> Any:
        with torch.inference_mode():
            return self.model(batch)

    def prepare(self, images: list[np.ndarray]) -> PreparedBatch:
        """Everything that needs the images alone: the model input and, with a grader, the image measurements.
        It touches nothing that :meth:`run` and :meth:`finish` use, so the worker runs it for the next batch in
        a helper thread while the current batch finishes (one prepare at a time)."""
        grader = self.meta.get("grader")
        return PreparedBatch(
            images=list(images), tensor=self.to_tensor(images) if images else None,
            image_features=features_of(images) if grader is not None and images else None,
        )

    def predict(self, images: list[np.ndarray] | PreparedBatch, explain: bool = True) -> list[ImagePrediction]:
        """Grades, masks and heatmaps of a batch: ``images`` (preprocessed RGB) or a batch from :meth:`prepare`."""
        batch = images if isinstance(images, PreparedBatch) else self.prepare(images)
        return self.finish(batch, self.run(batch), explain)

    def run(self, batch: PreparedBatch) -> Any:
        """The forward pass of a prepared batch (None for an empty one)."""
        return self.forward(batch.tensor) if batch.tensor is not None else None

    def finish(self, batch: PreparedBatch, out: Any, explain: bool = True) -> list[ImagePrediction]:
        """Grades (from the heads, or the grader), masks, areas and Grad-CAM of the forward output ``out``."""
        images = batch.images
        if not images:
            return []
        dr = out.dr_logits.float().softmax(1).cpu().numpy()
        dme = out.dme_logits.float().softmax(1).cpu().numpy()
        seg_probs = torch.sigmoid(out.seg_logits.float()).cpu().numpy()
        if "grader" in self.meta:  # grades from lesion evidence (see training/grader.py)
            grader = self.meta["grader"]
            feats = features_of(images, seg_probs if uses_segmentation(grader) else None, image_features=batch.image_features)
            dr, dme = apply_grader(grader, feats, dme)
        seg = seg_probs > self.lesion_threshold
        # a grader's own probabilities replace the heads', so the heads' calibration map does not apply to them
        ref = referable_probability(dr, dme, None if "grader" in self.meta else self.meta.get("referable_calibration"))
        dr_cls, dme_cls = dr.argmax(1), dme.argmax(1)
        if explain:
            evidence = lesion_evidence(out.seg_logits) if self.model.config.grade_inputs == "features+lesions" else None
            dr_cams = head_cams(self.model.dr_head, out.features, list(dr_cls), self.size, evidence)
            dme_cams = head_cams(self.model.dme_head, out.features, list(dme_cls), self.size, evidence)
        else:
            dr_cams = dme_cams = np.zeros((len(images), self.size, self.size), np.float32)
        preds = []
        for i, im in enumerate(images):
            field = fundus_mask(im)
            n_field = max(int(field.sum()), 1)
            areas = {code: float((seg[i, k] & field).sum()) / n_field for k, code in enumerate(LESION_CODES)}
            preds.append(ImagePrediction(
                dr_grade=int(dr_cls[i]), dr_probs=[float(x) for x in dr[i]],
                dme_grade=int(dme_cls[i]), dme_probs=[float(x) for x in dme[i]],
                referable_score=float(ref[i]), referable=bool(ref[i] >= self.threshold),
                masks=seg[i] & field[None], lesion_areas=areas, dr_cam=dr_cams[i], dme_cam=dme_cams[i],
            ))
        return preds
