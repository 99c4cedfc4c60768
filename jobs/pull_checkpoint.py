"""Pull a registered checkpoint (`models:/NAME@ALIAS` or `models:/NAME/VERSION`) and load it as a timm model.

    python jobs/pull_checkpoint.py models:/arm-tiny@champion --dst ./pulled [--tracking-uri http://mlflow:5000]
Prints where the files went and a one-line summary of the loaded model.
"""

import argparse

from arm_platform import registry

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_uri")
    parser.add_argument("--dst", default="./pulled")
    parser.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI")
    args = parser.parse_args()
    version = registry.resolve(args.model_uri, args.tracking_uri)
    model = registry.load_model(args.model_uri, dst_dir=args.dst, tracking_uri=args.tracking_uri)
    num_params = sum(p.numel() for p in model.parameters())
    print(f"pulled {args.model_uri} (version {version.version}) to {args.dst}")
    print(
        f"{type(model).__name__} {version.tags.get('timm_model', '?')}: {num_params / 1e6:.2f}M params, "
        f"recipe {version.tags.get('recipe', '?')}, val_acc1 {version.tags.get('val_acc1', 'n/a')}"
    )
