"""The speed benchmark of benchmarks/speed/README.md: ``vitlab bench`` with the project's targets.

    python benchmarks/speed/speed.py [--quick] [--cases ...] [--out FILE]   # the options of `vitlab bench`

The report is `vitlab bench`'s (vitlab, timm and transformers timed interleaved; install the peers
with ``pip install -c constraints.txt -e '.[bench]'``), followed by the targets of the performance
issue, each checked as a ratio within one case, so that it does not depend on the machine.
"""
from __future__ import annotations

import sys

from vitlab.bench import CaseResult, Row
from vitlab.cli import parse_args, run_bench


def best(result: CaseResult, *, ours: bool) -> Row:
    """The fastest vitlab variant (``ours``) or the fastest peer."""
    return min((r for r in result.rows if r.variant.startswith("vitlab") == ours), key=lambda r: r.seconds)


def format_targets(results: list[CaseResult]) -> str:
    """The targets, checked against these results (ratios within the same case)."""
    lines = ["| target | case | measured | met |", "|---|---|---|---|"]

    def add(target: str, case, measured: str, met: bool) -> None:
        lines.append(f"| {target} | {case.name} | {measured} | {'yes' if met else 'no'} |")

    for res in results:
        if len(res.rows) == 1:
            continue  # no peer installed: nothing to compare with
        c, ours, peer = res.case, best(res, ours=True), best(res, ours=False)
        ratio = peer.seconds / ours.seconds
        by = f" ({ours.variant} vs {peer.variant})"
        if not c.train and c.dtype == "bf16" and c.batch > 1:
            add(">= 1.2x best peer", c, f"{ratio:.2f}x{by}", ratio >= 1.2)
            add(">= 85% of bf16 matmul peak", c, f"{100 * ours.peak_fraction:.0f}% ({ours.variant})",
                ours.peak_fraction >= 0.85)
        if not c.train and c.dtype == "bf16" and c.batch == 1:
            add(">= 1.2x best peer (latency)", c, f"{ratio:.2f}x{by}", ratio >= 1.2)
        if not c.train and c.dtype == "fp32":
            add("no slower than best peer", c, f"{ratio:.2f}x{by}", ratio >= 1.0)
        if c.train and c.dtype == "bf16":
            for name, need in (("timm", 1.5), ("timm TIMM_FUSED_ATTN=0", 1.15)):
                r = res.row(name).seconds / ours.seconds
                add(f">= {need}x {name}", c, f"{r:.2f}x", r >= need)
        eager = res.row("vitlab")  # compiled variants are not measured for memory (they would compile again)
        if not c.train and c.dtype == "bf16" and eager.rss_mib is not None:
            timm = res.row("timm")  # bf16-cast weights
            add("peak RSS <= timm bf16 weights", c, f"{eager.rss_mib:.0f} vs {timm.rss_mib:.0f} MiB",
                eager.rss_mib <= timm.rss_mib)
    return "\n".join(lines)


def main(argv: list[str]) -> str:
    args = parse_args(["bench", *argv])
    report = run_bench(args, log=lambda msg: print(msg, file=sys.stderr))
    text = report.text + "\n#### Targets\n\n" + format_targets(report.results) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return text


if __name__ == "__main__":
    print(main(sys.argv[1:]))
