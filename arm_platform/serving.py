"""MLflow pyfunc model of a registered ARM classifier (a "models from code" file: nothing of ours is pickled).

`registry.register_checkpoint` saves this file into each version's MLflow Model folder (see `mlflow_model`), next to
the version's `model.pt` and `config.json`; MLflow runs it from there (`mlflow.pyfunc.load_model`, `mlflow models
serve`), so the folder is this file's own. `load_context` builds the model named in config.json and loads model.pt
(`torch.load(weights_only=True)`, refused unless a flat tensor state dict) through `registry.load_checkpoint_dir`,
the loader of `registry.load_model`: both give the same model. It runs on the CPU.

predict:
    model_input: float32 (B, 3, H, W) images normalised with the ImageNet mean / std, H = W = the model's img_size
        (`data.transforms.normalize` of the eval transform's uint8 output); a numpy array, or nested lists in the
        served JSON `{"inputs": [...]}`. MLflow checks it against the version's signature first.
    params: {"probabilities": True} returns softmax probabilities instead of logits.
    returns: float32 (B, num_classes) logits (or probabilities) as a numpy array.
"""

from pathlib import Path

import mlflow
import numpy as np
import torch

MODEL_DIR = Path(__file__).resolve().parent
"""The MLflow Model folder MLflow runs this file from: holds the version's model.pt and config.json."""


class ARMClassifierModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper of an ARMClassifier: normalised images (B, 3, H, W) -> logits (B, num_classes)."""

    def load_context(self, context) -> None:
        from arm_platform import registry

        self.model = registry.load_checkpoint_dir(MODEL_DIR)

    def predict(self, context, model_input: np.ndarray, params: dict | None = None) -> np.ndarray:
        images = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.inference_mode():
            out = self.model(images).float()
        if (params or {}).get("probabilities"):
            out = out.softmax(dim=-1)
        return out.numpy()


mlflow.models.set_model(ARMClassifierModel())
