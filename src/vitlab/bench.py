"""Speed benchmark: vitlab, and timm and Hugging Face transformers where installed, on the same ViT shapes.

For each case every variant is built in one process and timed round-robin (the order rotates
each round), so all variants see the same machine load; the reported time is the median over
rounds. A large ``torch.mm`` in the case's dtype runs in the same rounds and gives the matmul
peak that "% of peak" refers to. Peak memory (RSS) is measured per variant in its own
subprocess. The peers are optional (``pip install vitlab[bench]``): without them vitlab is
timed alone. The project's targets against the peers live with its results, in benchmarks/speed/.
"""
from __future__ import annotations

import dataclasses
import gc
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

import torch
import torch.nn.functional as F
from torch import nn

from .accel import accelerate, optimize
from .config import ViTConfig, as_pair
from .data import DataConfig
from .flops import vit_flops
from .models import model_config
from .models.vit import VisionTransformer
from .run import METRICS_FILE, read_metrics
from .train import train
from .trainconfig import TrainConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PEAK_SIZE = 2048  # the matmul that measures the peak: (n x n) @ (n x n)
Step = Callable[[], object]


@dataclass(frozen=True, kw_only=True)
class Case:
    """One benchmark: a vitlab preset, a batch size, a dtype, inference or a training step."""

    model: str
    batch: int
    dtype: str  # "fp32" or "bf16" (bf16 weights for inference, autocast for training)
    train: bool = False

    @property
    def name(self) -> str:
        return f"{self.model} {'train step' if self.train else 'inference'} batch {self.batch} {self.dtype}"

    @property
    def config(self) -> ViTConfig:
        return model_config(self.model)

    @property
    def flops(self) -> int:
        """FLOPs per iteration: forward x batch, times 3 for a training step (forward + backward)."""
        return vit_flops(self.config) * self.batch * (3 if self.train else 1)


FULL_CASES = tuple(
    Case(model=m, batch=b, dtype=d) for m in ("vit_s16", "vit_b16") for b in (1, 32) for d in ("fp32", "bf16")
) + tuple(Case(model="vit_ti4_32px", batch=128, dtype=d, train=True) for d in ("fp32", "bf16"))
QUICK_CASES = (
    Case(model="vit_s16", batch=1, dtype="bf16"),
    Case(model="vit_s16", batch=8, dtype="bf16"),
    Case(model="vit_ti4_32px", batch=32, dtype="bf16", train=True),
)


# --- the three libraries, built on the same shape --------------------------------------

# variant prefix -> the packages it needs
PEERS = {"timm": ("timm",), "HF": ("transformers",), "ORT": ("onnx", "onnxruntime", "onnxscript"),
         "OpenVINO": ("openvino", "nncf")}


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def _exported_step(case: Case, inputs: Inputs, runtime: str, int8: bool) -> Step:
    """The case's model exported for ``runtime`` (INT8 if asked; OpenVINO calibrated on 16 of the
    random inputs: enough for timing, not for accuracy) and run there; the files are removed."""
    from .checkpoint import LoadedModel
    from .deploy import export, load_exported

    model = VisionTransformer(case.config).eval()
    calibration = make_inputs(dataclasses.replace(case, batch=16)).images if int8 else None
    with tempfile.TemporaryDirectory() as tmp:
        path = export(LoadedModel(model), f"{tmp}/m{'.onnx' if runtime == 'onnxruntime' else '.xml'}", to=runtime,
                      int8=int8, calibration=calibration, check=False)
        run = load_exported(path, precision="bf16" if runtime == "openvino" and case.dtype == "bf16" and not int8
                            else "fp32").model
    return inference_step(run, inputs.images)


def _timm_model(cfg: ViTConfig, fused_attn: bool) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    model = TimmViT(img_size=as_pair(cfg.image_size), patch_size=cfg.patch_size, embed_dim=cfg.width,
                    depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_dim / cfg.width,
                    qkv_bias=cfg.qkv_bias, num_classes=cfg.num_classes)
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused_attn  # what TIMM_FUSED_ATTN=0 sets at import
    return model


def _hf_model(cfg: ViTConfig, attn: str) -> nn.Module:
    from transformers import ViTConfig as HFViTConfig
    from transformers import ViTForImageClassification

    hf = HFViTConfig(hidden_size=cfg.width, num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
                     intermediate_size=cfg.mlp_dim, image_size=as_pair(cfg.image_size)[0],
                     patch_size=cfg.patch_size, num_labels=cfg.num_classes, qkv_bias=cfg.qkv_bias,
                     layer_norm_eps=cfg.layer_norm_eps)
    model = ViTForImageClassification._from_config(hf, attn_implementation=attn)
    return _Logits(model)


class _Logits(nn.Module):
    """A transformers model called like the others: images -> logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def _vitlab_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    from .optim import OptimConfig, build_optimizer

    return build_optimizer(model, OptimConfig(lr=1e-3, weight_decay=0.05))  # fused AdamW


def _peer_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    # What timm's create_optimizer_v2(model, "adamw") and the HF Trainer's "adamw_torch" build
    # on a CPU: torch's AdamW with its defaults.
    return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)


# --- steps ------------------------------------------------------------------------------

@dataclass
class Inputs:
    images: torch.Tensor
    labels: torch.Tensor


def make_inputs(case: Case) -> Inputs:
    cfg = case.config
    g = torch.Generator().manual_seed(0)
    h, w = as_pair(cfg.image_size)
    return Inputs(torch.randn(case.batch, cfg.in_channels, h, w, generator=g),
                  torch.randint(0, cfg.num_classes, (case.batch,), generator=g))


def inference_step(model: nn.Module, images: torch.Tensor, *, autocast: bool = False) -> Step:
    """One no-grad forward pass."""
    def step():
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            return model(images)
    return step


def train_step(model: nn.Module, opt: torch.optim.Optimizer, inputs: Inputs, *, autocast: bool) -> Step:
    """Forward, cross-entropy, backward and optimizer step (bf16 = autocast, fp32 master weights)."""
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(model(inputs.images), inputs.labels)
        loss.backward()
        opt.step()
    return step


def _build(variant: str, case: Case, inputs: Inputs) -> Step:
    """The step of ``variant`` on ``case``. Inference in bf16 casts weights to bf16 except "autocast"."""
    cfg = case.config
    lib, _, option = variant.partition(" ")
    if lib in ("ORT", "OpenVINO"):
        return _exported_step(case, inputs, "onnxruntime" if lib == "ORT" else "openvino", int8=option == "int8")
    if variant == "vitlab int8":  # PyTorch's dynamic INT8 (torch.ao, oneDNN/fbgemm) of the plain model
        model = torch.ao.quantization.quantize_dynamic(VisionTransformer(cfg).eval(), {nn.Linear}, dtype=torch.qint8)
        return inference_step(model, inputs.images)
    if lib == "vitlab":
        model: nn.Module = accelerate(VisionTransformer(cfg))
    elif lib == "timm":
        model = _timm_model(cfg, fused_attn=option != "TIMM_FUSED_ATTN=0")
    elif lib == "HF":
        model = _hf_model(cfg, attn=option)
    else:
        raise ValueError(f"unknown variant {variant!r}")
    if case.train:
        opt = _vitlab_optimizer(model) if lib == "vitlab" else _peer_optimizer(model)
        if option == "torch.compile":
            model = torch.compile(model)
        return train_step(model, opt, inputs, autocast=case.dtype == "bf16")
    dtype = DTYPES[case.dtype]
    if option == "autocast":
        return inference_step(model.eval(), inputs.images, autocast=True)
    model = optimize(model, dtype) if lib == "vitlab" else model.to(dtype).eval()
    if option == "torch.compile":
        model = torch.compile(model)
    return inference_step(model, inputs.images.to(dtype))


def variants(case: Case, *, compile: bool = True, runtimes: bool = False) -> list[str]:
    """vitlab first, then the installed peers' variants that apply to ``case``. With ``runtimes``,
    inference also runs on ONNX Runtime and OpenVINO, and the bf16 cases hold the INT8 paths."""
    names = ["vitlab", "timm", "timm TIMM_FUSED_ATTN=0"]
    if compile:
        names.append("timm torch.compile")
    if case.dtype == "bf16" and not case.train:
        names.append("timm autocast")
    names += ["HF sdpa", "HF eager"]
    if runtimes and not case.train:
        names += ["ORT", "OpenVINO"] if case.dtype == "fp32" else ["OpenVINO", "vitlab int8", "ORT int8",
                                                                    "OpenVINO int8"]
    return [n for n in names if n == "vitlab" or n.startswith("vitlab ")
            or all(installed(p) for p in PEERS[n.split()[0]])]


def peak_step(dtype: torch.dtype) -> Step:
    a = torch.randn(PEAK_SIZE, PEAK_SIZE, dtype=dtype)
    b = torch.randn(PEAK_SIZE, PEAK_SIZE, dtype=dtype)
    return lambda: torch.mm(a, b)


# --- timing and memory ------------------------------------------------------------------

CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}  # cpu: this thread's CPU time (1 thread only)


def _seconds(step: Step, iters: int, clock: Callable[[], float] = time.perf_counter) -> float:
    start = clock()
    for _ in range(iters):
        step()
    return (clock() - start) / iters


def time_interleaved(steps: dict[str, Step], *, rounds: int, target_s: float, clock: str = "wall",
                     ) -> dict[str, list[float]]:
    """Seconds of every call of each step, timed round-robin with a rotating order (~``target_s`` of
    calls per step and round)."""
    tick = CLOCKS[clock]
    iters = {}
    for name, step in steps.items():
        step()  # warm-up (and compilation)
        iters[name] = max(1, round(target_s / _seconds(step, 1, tick)))
    samples: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            samples[name] += [_seconds(steps[name], 1, tick) for _ in range(iters[name])]
    return samples


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def measure_memory(case: Case, variant: str, threads: int, repeats: int = 3) -> int:
    """Peak RSS in bytes of ``variant`` running ``case``: the median of ``repeats`` fresh subprocesses.

    The peak is reset after the model is built and warmed up, so it covers the steady state:
    weights, activations (and gradients and optimizer state for a training step), and the
    libraries' own memory, not the fp32 weights a model is built with before a cast. One
    process varies by tens of MiB from the next (the allocator), hence the median.
    """
    arg = json.dumps({"case": dataclasses.asdict(case), "variant": variant, "threads": threads})
    peaks = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-m", "vitlab.bench", "--memory-probe", arg],
                             capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"memory probe for {variant!r} on {case.name} failed:\n{out.stderr[-2000:]}")
        peaks.append(int(out.stdout.strip().splitlines()[-1]))
    return int(statistics.median(peaks))


def _memory_probe(arg: str) -> int:
    spec = json.loads(arg)
    for lib in ("timm", "transformers", "onnxruntime", "openvino"):  # every variant carries the same library code
        try:
            __import__(lib)
        except ImportError:
            pass
    torch.set_num_threads(spec["threads"])
    case = Case(**spec["case"])
    return steady_peak_rss(_build(spec["variant"], case, make_inputs(case)))


def steady_peak_rss(step: Step) -> int:
    """Peak RSS in bytes of this process during ``step()``, run once to warm up first (Linux)."""
    step()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    step()
    return _proc_status("VmHWM")


# --- the run ----------------------------------------------------------------------------

@dataclass
class Row:
    variant: str
    seconds: float  # the median call
    gflops: float
    peak_fraction: float
    rss_mib: float | None
    p90_seconds: float | None = None  # the 90th-percentile call


@dataclass
class CaseResult:
    case: Case
    peak_gflops: float
    rows: list[Row]

    def row(self, variant: str) -> Row:
        return next(r for r in self.rows if r.variant == variant)


def run_case(case: Case, *, rounds: int, target_s: float, threads: int, compile: bool = True,
             memory: bool = True, runtimes: bool = False, clock: str = "wall",
             log: Callable[[str], None] = print) -> CaseResult:
    """Time every variant of ``case`` interleaved with the matmul peak; optionally their memory."""
    inputs = make_inputs(case)
    torch.manual_seed(0)
    steps = {v: _build(v, case, inputs) for v in variants(case, compile=compile, runtimes=runtimes)}
    steps["matmul peak"] = peak_step(DTYPES[case.dtype])
    log(f"{case.name}: timing {len(steps)} steps x {rounds} rounds")
    samples = time_interleaved(steps, rounds=rounds, target_s=target_s, clock=clock)
    peak = 2 * PEAK_SIZE**3 / statistics.median(samples.pop("matmul peak")) / 1e9
    del steps
    gc.collect()
    rows = []
    for variant, calls in samples.items():
        # Memory where the targets need it (bf16); a compiled variant would compile again.
        measured = memory and case.dtype == "bf16" and "compile" not in variant
        rss = measure_memory(case, variant, threads) / 2**20 if measured else None
        s = statistics.median(calls)
        gflops = case.flops / s / 1e9
        p90 = statistics.quantiles(calls, n=10)[-1] if len(calls) >= 10 else None
        rows.append(Row(variant, s, gflops, gflops / peak, rss, p90))
    return CaseResult(case, peak, rows)


def run_epoch(data_path: str, *, batch: int = 128, dtype: str = "bf16", max_batches: int = 0, threads: int = 2,
              log: Callable[[str], None] = print) -> str:
    """vitlab's own training loop (``vitlab.train``: loader with augmentation, autocast, clipping,
    schedule, logging) on CIFAR-10, against the bare training step timed before and after it.

    ``max_batches`` > 0 runs that many steps instead of the whole epoch (the report says so).
    """
    case = Case(model="vit_ti4_32px", batch=batch, dtype=dtype, train=True)
    bare_step = _build("vitlab", case, make_inputs(case))

    def bare() -> float:
        for _ in range(5):  # the allocator settles over the first steps
            bare_step()
        return statistics.median(_seconds(bare_step, 1) for _ in range(8))

    before = bare()
    # 2% of train held out as val keeps the closing evaluation short; the rest is one epoch.
    cfg = TrainConfig(model=case.model, data=DataConfig(path=data_path, val_split=0.02), batch_size=batch,
                      precision=dtype, steps=max_batches, threads=threads)
    with tempfile.TemporaryDirectory() as run:
        log(f"epoch: vitlab.train on {data_path}, {max_batches or 'one epoch of'} steps")
        train(cfg, run, log=lambda msg: None)
        rates = [m["images_per_s"] for m in read_metrics(f"{run}/{METRICS_FILE}") if "images_per_s" in m]
    after = bare()
    loop = statistics.median(rates[5:])  # the first steps warm up
    step = batch / statistics.mean([before, after])
    scope = f"the first {len(rates)} steps of the epoch" if max_batches else f"one epoch ({len(rates)} steps)"
    return (f"#### vit_ti4_32px end-to-end training, batch {batch} {dtype}, CIFAR-10 train with augmentation "
            f"(pad-crop + flip), `vitlab.train`, {scope}\n\n"
            "| | images/s (median over steps) |\n|---|---:|\n"
            f"| `vitlab.train` loop (data, augmentation, step, clipping, logging) | {loop:.1f} |\n"
            f"| bare training step (random tensors), before / after the loop | {batch / before:.1f} / "
            f"{batch / after:.1f} |\n"
            f"| loop slower than the bare step (mean of the two) by | {100 * (step / loop - 1):.1f}% |\n")


def machine() -> dict[str, str]:
    """CPU model, library versions, threads and the load average now."""
    import importlib.metadata as md

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = {}
    for pkg in ("torch", "timm", "transformers", "onnxruntime", "openvino"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = "not installed"
    return {"cpu": cpu, "cores": str(os.cpu_count()), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "python": platform.python_version(), **versions,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def format_case(result: CaseResult) -> str:
    """A markdown table of one case."""
    case, base = result.case, result.row("vitlab").seconds
    lines = [f"#### {case.name} ({case.flops / case.batch / 1e9 / (3 if case.train else 1):.2f} GFLOPs/image forward; "
             f"{case.dtype} matmul peak {result.peak_gflops:.0f} GFLOP/s in the same rounds)", "",
             "| variant | ms / iter (p50) | p90 | images/s | GFLOP/s | % of peak | vitlab speed-up | peak RSS MiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result.rows:
        rss = f"{r.rss_mib:.0f}" if r.rss_mib is not None else "-"
        p90 = f"{r.p90_seconds * 1e3:.1f}" if r.p90_seconds is not None else "-"
        lines.append(f"| {r.variant} | {r.seconds * 1e3:.1f} | {p90} | {case.batch / r.seconds:.1f} | {r.gflops:.0f} | "
                     f"{100 * r.peak_fraction:.0f}% | {r.seconds / base:.2f}x | {rss} |")
    return "\n".join(lines)


@dataclass
class Report:
    text: str  # markdown: the machine, then a table per case
    results: list[CaseResult]

    def __str__(self) -> str:
        return self.text


def run(cases: tuple[Case, ...], *, rounds: int, target_s: float, threads: int = 2, compile: bool = True,
        memory: bool = True, runtimes: bool = False, data: str | None = None, epoch_batches: int = 0,
        clock: str = "wall", log: Callable[[str], None] = print) -> Report:
    """Run ``cases`` (and the epoch on ``data`` if given); return the markdown report and the results.

    ``clock="cpu"`` times this thread's CPU time instead of wall time: with one thread it is all
    the compute, and it barely moves when other processes share the cores (not with ``runtimes``:
    ONNX Runtime and OpenVINO compute on threads of their own).
    """
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {sorted(CLOCKS)}, got {clock!r}")
    if clock == "cpu" and threads != 1:
        raise ValueError("clock='cpu' measures one thread; use it with threads=1")
    if clock == "cpu" and runtimes:
        raise ValueError("clock='cpu' cannot time ONNX Runtime or OpenVINO (their own threads); use runtimes=False")
    torch.set_num_threads(threads)
    info = machine()
    load_before = load_average()
    missing = [p for packages in PEERS.values() for p in packages if not installed(p)]
    skipped = (f"- not installed, so not timed: {', '.join(missing)} (pip install 'vitlab[bench]' and "
               "'vitlab[deploy]' time vitlab against them)" if missing else "")
    log(f"load average before: {load_before}" + (f"; {skipped[2:]}" if missing else ""))
    results = []
    for c in cases:
        results.append(run_case(c, rounds=rounds, target_s=target_s, threads=threads, compile=compile,
                                memory=memory, runtimes=runtimes, clock=clock, log=log))
        log(format_case(results[-1]))  # progress: each table as soon as it is measured
    epoch = run_epoch(data, max_batches=epoch_batches, threads=threads, log=log) if data else ""
    load_after = load_average()
    head = [f"- machine: {info['cpu']}, {info['cores']} cores ({info['cpu_capability']}), {threads} threads",
            f"- versions: python {info['python']}, torch {info['torch']}, timm {info['timm']}, "
            f"transformers {info['transformers']}, onnxruntime {info['onnxruntime']}, openvino {info['openvino']}",
            f"- date: {info['date']}; rounds: {rounds}, ~{target_s:g} s per timing, {clock} clock; "
            f"load average (1, 5, 15 min) before {load_before}, after {load_after}"] + ([skipped] if missing else [])
    body = [format_case(r) for r in results] + ([epoch] if epoch else [])
    return Report("\n".join(head) + "\n\n" + "\n\n".join(body) + "\n", results)


if __name__ == "__main__" and sys.argv[1:2] == ["--memory-probe"]:
    print(_memory_probe(sys.argv[2]))
