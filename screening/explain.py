"""Grad-CAM for the DR and DME heads, computed from the prediction's own forward pass.

Both classification heads read the encoder's last stage. The network runs once; its last-stage
activations are handed to each head wrapped so that pytorch-grad-cam's ``GradCAM`` hooks an
identity layer sitting exactly where ``encoder.layer4`` ends. The CAM classes then re-run only the
tiny head (pool + MLP) and back-propagate to those activations: the same gradients and the same
maps as Grad-CAM on ``encoder.layer4`` of the full model, without a second full forward.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import scale_cam_image, show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from .legend import LESION_COLOURS_RGB


class HeadOnFeatures(nn.Module):
    """One classification head applied to precomputed encoder features; ``layer`` is the CAM target.

    A v2 evidence head also reads the lesion head's evidence; that is passed in and held constant, so the map
    shows where in the encoder's last stage the grade came from (the decoder path is not back-propagated).
    """

    def __init__(self, head: nn.Module, evidence: torch.Tensor | None = None) -> None:
        super().__init__()
        self.layer = nn.Identity()
        self.head = head
        self.evidence = evidence

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.evidence is None:
            out: torch.Tensor = self.head(self.layer(features))
        else:
            out = self.head(self.layer(features), self.evidence)
        return out


def head_cams(head: nn.Module, features: torch.Tensor, classes: list[int], out_size: int,
              evidence: torch.Tensor | None = None) -> np.ndarray:
    """Grad-CAM maps (N, out_size, out_size) in [0, 1] for the given class of each sample."""
    wrapper = HeadOnFeatures(head, None if evidence is None else evidence.detach().clone().float())
    # a normal tensor (not an inference tensor) that autograd tracks, so the hooks see its gradient
    feats = features.detach().clone().float().requires_grad_(True)
    with torch.enable_grad(), GradCAM(model=wrapper, target_layers=[wrapper.layer]) as cam:
        maps = cam(input_tensor=feats, targets=[ClassifierOutputTarget(int(c)) for c in classes])
    # maps are at the feature grid (input of the wrapper); upscale like GradCAM does for a full model
    scaled: np.ndarray = scale_cam_image(maps, (out_size, out_size)).astype(np.float32)
    return scaled


def cam_overlay(rgb: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """Heatmap over the photo (uint8 RGB)."""
    overlay: np.ndarray = show_cam_on_image(rgb.astype(np.float32) / 255.0, cam, use_rgb=True, image_weight=0.55)
    return overlay


def lesion_overlay(rgb: np.ndarray, masks: np.ndarray, codes: tuple[str, ...]) -> np.ndarray:
    """Colour each lesion mask over the photo; outlines for the optic disc so it does not hide lesions."""
    out = rgb.copy()
    for k, code in enumerate(codes):
        m = masks[k].astype(bool)
        if not m.any():
            continue
        colour = np.array(LESION_COLOURS_RGB[code], dtype=np.float32)
        if code == "OD":
            contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(out, contours, -1, tuple(int(c) for c in colour), 2)
        else:
            out[m] = (0.35 * out[m] + 0.65 * colour).astype(np.uint8)
    return out
