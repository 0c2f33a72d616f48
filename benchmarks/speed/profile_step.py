"""Where a step's time goes (torch.profiler), by kind of op, for any case and variant of the benchmark.

    python benchmarks/speed/profile_step.py vit_s16 32 bf16                 # vitlab inference
    python benchmarks/speed/profile_step.py vit_ti4_32px 128 bf16 --train --variant "timm"
"""
import argparse
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from vitlab import bench

KINDS = {  # aten op -> kind; the rest is "other"
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"),
    "convolution": ("aten::mkldnn_convolution", "aten::convolution_backward"),
    "batch norm, ReLU": ("aten::native_batch_norm", "aten::native_batch_norm_backward",
                         "aten::_batch_norm_with_update", "aten::batch_norm_backward",
                         "aten::threshold_backward", "aten::relu_"),
    "flash attention": ("aten::_scaled_dot_product_flash_attention_for_cpu",
                        "aten::_scaled_dot_product_flash_attention_for_cpu_backward"),
    "softmax": ("aten::_softmax", "aten::_softmax_backward_data"),
    "gelu": ("aten::gelu", "aten::gelu_backward"),
    "layer norm": ("aten::native_layer_norm", "aten::native_layer_norm_backward"),
    "copies and casts": ("aten::copy_", "aten::cat", "aten::clone"),
    "elementwise (add, mul, sum)": ("aten::add", "aten::add_", "aten::mul", "aten::sum", "aten::div"),
    "optimizer": ("aten::_fused_adamw_", "aten::_foreach_mul_", "aten::_foreach_add_", "aten::lerp_",
                  "aten::addcmul_", "aten::addcdiv_", "aten::sqrt", "aten::mul_", "aten::div_"),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("batch", type=int)
    p.add_argument("dtype", choices=sorted(bench.DTYPES))
    p.add_argument("--train", action="store_true")
    p.add_argument("--variant", default="vitlab")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--top", type=int, default=12)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    case = bench.Case(model=args.model, batch=args.batch, dtype=args.dtype, train=args.train)
    print(f"{args.variant}: {case.name}, {args.threads} threads")
    by_kind(bench._build(args.variant, case, bench.make_inputs(case)), top=args.top)


def by_kind(step, *, top: int = 12, indent: str = "  ") -> None:
    """Profile one call of ``step`` (after 3 warm-up calls); print the aten self time by kind and the top ops."""
    for _ in range(3):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in events)
    kinds: dict[str, float] = defaultdict(float)
    for e in events:
        kind = next((k for k, ops in KINDS.items() if e.key in ops), "other")
        kinds[kind] += e.self_cpu_time_total
    print(f"{indent}{total / 1e3:.1f} ms of aten self time")
    for kind, t in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"{indent}{kind:<30}{100 * t / total:6.1f}%")
    print(f"{indent}top ops:")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]:
        print(f"{indent}  {e.key:<52}{100 * e.self_cpu_time_total / total:6.1f}%  x{e.count}")


if __name__ == "__main__":
    main()
