"""Predictor: load the checkpoint once, grade batches of images, explain both heads from one forward."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from training.api import (
    calibrated_referable,
    eval_transforms,
    features_of,
    fundus_mask,
    grades_with_grader,
    lesion_evidence,
    load_model,
    resolve_device,
    uses_segmentation,
)
from training.common import LESION_CODES

from .config import BFLOAT16_REFUSED
from .explain import head_cams
from .report import grade_source, model_metrics_for_report

log = logging.getLogger(__name__)

Precision = Literal["float32", "float16"]
AUTOCAST_DTYPES = {"float16": torch.float16}
MAX_GPU_BATCH = 256  # beyond this a GPU gains nothing per image and a failed batch costs more photos
MEMORY_HEADROOM = 1.25  # measured activation memory x this: the allocator's fragmentation and cuDNN workspaces


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


def batch_size_for_memory(budget_bytes: float, fixed_bytes: float, per_image_bytes: float, cap: int = MAX_GPU_BATCH) -> int:
    """The most images per forward whose peak memory, ``fixed + n * per_image`` times :data:`MEMORY_HEADROOM`,
    stays within ``budget_bytes`` (at most ``cap``). Raises ValueError when not even one image fits."""
    need_one = (fixed_bytes + per_image_bytes) * MEMORY_HEADROOM
    if budget_bytes < need_one:
        raise ValueError(f"{budget_bytes / 1e9:.2f} GB of GPU memory is not enough for one image "
                         f"(needs {need_one / 1e9:.2f} GB with this model and precision)")
    n = int((budget_bytes / MEMORY_HEADROOM - fixed_bytes) // max(per_image_bytes, 1.0))
    return max(1, min(cap, n))


class Predictor:
    """Holds the model for the worker's lifetime; ``predict`` takes preprocessed RGB images.

    On a GPU, ``precision = "float16"`` runs the trunk under autocast (the grade heads stay float32, see
    ``MultiTaskNet.forward``; the heads' probabilities, the masks and their areas stay within the tolerance tested
    in tests/screening/test_inference.py of float32; Grad-CAM is computed in float32 from the half-precision
    features). bfloat16 is refused: :data:`BFLOAT16_REFUSED`, and batches travel to the
    device from pinned host memory without blocking. On the CPU the default (float32, plain ``.to``) runs exactly
    the operations it always did: the outputs are bit-identical.
    """

    def __init__(self, checkpoint: Path, device: str = "auto", threads: int = 2, precision: Precision = "float32") -> None:
        if precision not in ("float32", *AUTOCAST_DTYPES):
            why = f" ({BFLOAT16_REFUSED})" if str(precision) == "bfloat16" else ""  # a caller without the types
            raise ValueError(f"precision {precision!r}: use 'float32' or 'float16'{why}")
        torch.set_num_threads(threads)
        self.device = resolve_device(device)
        self.precision: Precision = precision
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
        batch = torch.stack([self.transform(image=im)["image"] for im in images])
        if self.device.type == "cuda":  # page-locked: the copy is a DMA that overlaps the host's next work
            return batch.pin_memory().to(self.device, non_blocking=True)
        return batch.to(self.device)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.precision == "float32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=AUTOCAST_DTYPES[self.precision])

    def forward(self, batch: torch.Tensor) -> Any:
        with torch.inference_mode(), self._autocast():
            return self.model(batch)

    def measure_memory(self) -> tuple[int, int]:
        """(fixed, per image) bytes of GPU memory that grading a batch needs beyond the loaded weights, from
        the peaks of a real forward pass and both Grad-CAMs at batch sizes 1 and 2 (zeros as input: activation
        memory depends on the shapes alone)."""
        if self.device.type != "cuda":
            raise RuntimeError(f"GPU memory can only be measured on a CUDA device, not {self.device}")
        peaks = []
        for n in (1, 2):
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            out = self.forward(torch.zeros(n, 3, self.size, self.size, device=self.device))
            evidence = lesion_evidence(out.seg_logits) if self.model.config.grade_inputs == "features+lesions" else None
            head_cams(self.model.dr_head, out.features, [0] * n, self.size, evidence)
            torch.cuda.synchronize(self.device)
            peaks.append(torch.cuda.max_memory_allocated(self.device) - start)
            del out, evidence
        per_image = max(peaks[1] - peaks[0], 1)
        return max(peaks[0] - per_image, 0), per_image

    def batch_size_for(self, gpu_memory_gb: float, cap: int = MAX_GPU_BATCH) -> int:
        """Images per forward that fit in ``gpu_memory_gb`` (see :func:`batch_size_for_memory`)."""
        fixed, per_image = self.measure_memory()
        n = batch_size_for_memory(gpu_memory_gb * 1e9, fixed, per_image, cap)
        log.info("GPU batch: %d images in %.1f GB (%s: %.0f MB per image, %.0f MB fixed)", n, gpu_memory_gb,
                 self.precision, per_image / 1e6, fixed / 1e6)
        return n

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
        if "grader" in self.meta:  # grades from lesion evidence, alone or blended with the heads (training/grader.py)
            grader = self.meta["grader"]
            feats = features_of(images, seg_probs if uses_segmentation(grader) else None, image_features=batch.image_features)
            dr, dme = grades_with_grader(grader, feats, dr, dme)
        seg = seg_probs > self.lesion_threshold
        # the map was fitted on the score these probabilities give (`dr-train fit-grader` drops the heads' map)
        ref = referable_probability(dr, dme, self.meta.get("referable_calibration"))
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
