"""Lesion overlay colours, shared by the overlay drawer (``screening.explain``) and the report legend.

Kept apart from both so that the report renderer, which runs in its own process, does not import torch.
"""

from __future__ import annotations

# RGB. MA red, HE maroon, EX yellow, SE light blue, OD green.
LESION_COLOURS_RGB: dict[str, tuple[int, int, int]] = {
    "MA": (255, 40, 40),
    "HE": (150, 0, 40),
    "EX": (255, 230, 0),
    "SE": (170, 220, 255),
    "OD": (40, 200, 80),
}

__all__ = ["LESION_COLOURS_RGB"]
