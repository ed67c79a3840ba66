from ..labels import DME_GRADES, DR_GRADES, LESION_CODES, LESIONS
from .heads import EVIDENCE_STATS, lesion_evidence
from .multitask import IMAGENET_MEAN, IMAGENET_STD, ModelConfig, MultiTaskNet, MultiTaskOutput, build_model

__all__ = [
    "DME_GRADES", "DR_GRADES", "EVIDENCE_STATS", "IMAGENET_MEAN", "IMAGENET_STD", "LESION_CODES", "LESIONS", "ModelConfig",
    "MultiTaskNet", "MultiTaskOutput", "build_model", "lesion_evidence",
]
