"""Pull a registered checkpoint (`models:/NAME@ALIAS` or `models:/NAME/VERSION`) and load it as a timm model.

    python jobs/pull_checkpoint.py models:/arm-tiny@champion --dst ./pulled [--tracking-uri http://mlflow:5000]
Prints where the files went and a one-line summary of the loaded model: which weights it holds (raw or EMA) and
their val top-1 (the version's `exported_acc1` tag). A model.pt that is not a flat tensor state dict is refused, and
every error (unknown alias, unreachable registry, bad file) is one line naming the URI, exit status 1.
"""

import argparse
import sys

from arm_platform import registry


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_uri")
    parser.add_argument("--dst", default="./pulled")
    parser.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI")
    args = parser.parse_args(argv)
    try:
        version = registry.resolve(args.model_uri, args.tracking_uri)
        model = registry.load_model(args.model_uri, dst_dir=args.dst, tracking_uri=args.tracking_uri)
    except (ValueError, ConnectionError) as err:
        print(f"pull_checkpoint: {err}", file=sys.stderr)
        return 1
    num_params = sum(p.numel() for p in model.parameters())
    tags = version.tags
    print(f"pulled {args.model_uri} (version {version.version}) to {args.dst}")
    print(
        f"{type(model).__name__} {tags.get('timm_model', '?')}: {num_params / 1e6:.2f}M params, recipe "
        f"{tags.get('recipe', '?')}, {tags.get('weights', '?')} weights, top-1 {tags.get('exported_acc1', 'n/a')}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
