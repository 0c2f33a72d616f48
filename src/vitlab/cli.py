"""``vitlab <verb>``: parse arguments and call the library; nothing else lives here."""
from __future__ import annotations

import argparse
import sys

from .config import as_pair
from .flops import count_flops
from .models import build_model, get_spec, list_models


def cmd_models(args: argparse.Namespace) -> int:
    """Print every preset: parameters, GFLOPs per image, tokens, resolution."""
    print(f"{'model':<16}{'params':>14}{'GFLOPs':>10}{'tokens':>8}  {'resolution':<11}description")
    for name in list_models(args.filter):
        spec = get_spec(name)
        model = build_model(spec.config)
        params = sum(p.numel() for p in model.parameters())
        h, w = as_pair(spec.config.image_size)
        tokens = getattr(spec.config, "num_patches", 0) + getattr(spec.config, "num_prefix_tokens", 0)
        gflops = count_flops(model) / 1e9
        print(f"{name:<16}{params:>14,}{gflops:>10.2f}{tokens:>8}  {f'{h}x{w}':<11}{spec.description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitlab", description="The Vision Transformer, end to end.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list model presets with parameters and FLOPs")
    p.add_argument("filter", nargs="?", default="", help="only names containing this")
    p.set_defaults(func=cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"vitlab {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
