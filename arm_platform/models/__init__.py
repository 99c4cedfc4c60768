"""ARM models: pretraining (`ARMPretrain`), finetune classifier (`ARMClassifier`), `build_model`, checkpoint conversion.

Importing this package (which `import arm_platform` does) registers the timm names
`arm_{tiny_pz4,small_pz16,base_pz16,large_pz16,huge_pz16}` (classifier, 224 px / 1000 classes by default; tiny:
32 px / 10 classes) and the same + `_pretrain` (pretraining model, 192 px; tiny: 32 px). See `factory`.
"""

from arm_platform.models.arm import ARMPretrain
from arm_platform.models.classifier import ARMClassifier
from arm_platform.models.factory import REGISTERED_MODELS, build_model, default_model_config, model_config

__all__ = ["ARMClassifier", "ARMPretrain", "REGISTERED_MODELS", "build_model", "default_model_config", "model_config"]
