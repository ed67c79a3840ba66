from .multitask import (
    DME_GRADES, DR_GRADES, IMAGENET_MEAN, IMAGENET_STD, LESION_CODES, LESIONS, ModelConfig, MultiTaskNet,
    MultiTaskOutput, build_model,
)
from .heads import EVIDENCE_STATS, lesion_evidence

__all__ = [
    "DME_GRADES", "DR_GRADES", "EVIDENCE_STATS", "IMAGENET_MEAN", "IMAGENET_STD", "LESION_CODES", "LESIONS", "ModelConfig",
    "MultiTaskNet", "MultiTaskOutput", "build_model", "lesion_evidence",
]
