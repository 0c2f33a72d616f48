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


def cmd_bench(args: argparse.Namespace) -> int:
    """Time vitlab against timm and transformers, interleaved; print (and save) the markdown report."""
    from . import bench

    cases = bench.QUICK_CASES if args.quick else bench.FULL_CASES
    cases = tuple(c for c in cases if args.cases in c.name)
    if not cases:
        raise ValueError(f"no benchmark case matches {args.cases!r}; see `vitlab bench --help`")
    rounds = args.rounds or (3 if args.quick else 7)
    report = bench.run(cases, rounds=rounds, target_s=0.3 if args.quick else 1.0, threads=args.threads,
                       compile=not (args.quick or args.no_compile), memory=not (args.quick or args.no_memory),
                       log=lambda msg: print(msg, file=sys.stderr))
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitlab", description="The Vision Transformer, end to end.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list model presets with parameters and FLOPs")
    p.add_argument("filter", nargs="?", default="", help="only names containing this")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("bench", help="speed against timm and transformers (needs vitlab[bench])")
    p.add_argument("--quick", action="store_true", help="3 small cases, 3 rounds, no compile or memory (~1 min)")
    p.add_argument("--cases", default="", help="only cases whose name contains this, e.g. 'vit_s16' or 'train'")
    p.add_argument("--rounds", type=int, default=0, help="timing rounds (default 7, quick 3)")
    p.add_argument("--threads", type=int, default=2, help="torch threads for every variant")
    p.add_argument("--no-compile", action="store_true", help="leave out timm + torch.compile")
    p.add_argument("--no-memory", action="store_true", help="skip the per-variant peak-RSS subprocesses")
    p.add_argument("--out", help="also write the markdown report to this file")
    p.set_defaults(func=cmd_bench)
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
