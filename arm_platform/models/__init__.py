"""ARM models: pretraining (`ARMPretrain`), finetune classifier (`ARMClassifier`), `build_model`, checkpoint conversion.

Importing this package registers the timm names `arm_{tiny_pz4,small_pz16,base_pz16,large_pz16,huge_pz16}` (classifier)
and the same + `_pretrain` (pretraining model).
"""

from arm_platform.models.arm import ARMPretrain
from arm_platform.models.classifier import ARMClassifier
from arm_platform.models.factory import REGISTERED_MODELS, build_model, model_config

__all__ = ["ARMClassifier", "ARMPretrain", "REGISTERED_MODELS", "build_model", "model_config"]
