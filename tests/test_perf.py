"""The fast paths agree with the plain explicit path; the benchmark harness runs (never timed)."""
import subprocess
import sys
import pytest
import torch
import torch.nn.functional as F

import vitlab
from vitlab import bench
from vitlab.accel import matmul_attention, sdpa_is_faster

from helpers import load_benchmark


def tiny(**kw):
    # head_dim 12: the scale 1/sqrt(12) is not a power of two, so folding it is not exact
    kw = {"num_classes": 5, "width": 48, "depth": 2, "mlp_dim": 96, "num_heads": 4, **kw}
    return vitlab.create_model("vit_mu4_32px", **kw)


def pair(**kw):
    """Two models with the same weights: fused (the fast paths) and explicit."""
    torch.manual_seed(0)
    fused = tiny(fused_attention=True, **kw)
    torch.nn.init.normal_(fused.head.weight, std=0.5)
    explicit = tiny(fused_attention=False, **kw)
    explicit.load_state_dict(fused.state_dict())
    return fused, explicit


def explicit_attention(q, k, v, scale):
    return ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_matmul_attention_matches_explicit_forward_and_backward(dtype, tol):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 12, dtype=dtype, requires_grad=True) for _ in range(3))
    g = torch.randn(2, 3, 17, 12, dtype=dtype)
    out = matmul_attention(q, k, v, 12**-0.5, torch.nn.Identity())
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref = explicit_attention(q, k, v, 12**-0.5)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    assert out.dtype == dtype and out.shape == (2, 3, 17, 12)
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)
    with torch.no_grad():  # inference: the softmax is written over the scores
        torch.testing.assert_close(matmul_attention(q, k, v, 12**-0.5, torch.nn.Identity()), ref.detach(),
                                   atol=tol, rtol=tol)


def test_sdpa_rule():
    x32, x16 = torch.zeros(1, 2, 4), torch.zeros(1, 2, 4, dtype=torch.bfloat16)
    assert sdpa_is_faster(x32) and not sdpa_is_faster(x16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not sdpa_is_faster(x32)


@pytest.mark.parametrize("dtype, autocast, expect_sdpa", [
    (torch.float32, False, True), (torch.bfloat16, False, False), (torch.float32, True, False)])
def test_fused_attention_dispatches_by_dtype(monkeypatch, dtype, autocast, expect_sdpa):
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    model = tiny().to(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        model(torch.randn(2, 3, 32, 32))
    assert bool(calls) == expect_sdpa


def _loss_and_grads(model, x, y, autocast):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(x)
        loss = F.cross_entropy(logits, y)
    loss.backward()
    return logits.float(), {n: p.grad.float() for n, p in model.named_parameters()}


def _run(model, x, y, autocast):
    torch.manual_seed(1)  # the same drop-path draws for every model
    return _loss_and_grads(model, x, y, autocast)


def test_training_fp32_sdpa_matches_explicit_forward_and_backward():
    fused, explicit = pair(drop_path=0.1)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    (out_f, grads_f), (out_e, grads_e) = _run(fused, x, y, False), _run(explicit, x, y, False)
    torch.testing.assert_close(out_f, out_e, atol=1e-5, rtol=1e-5)
    for name, g in grads_e.items():
        torch.testing.assert_close(grads_f[name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_training_bf16_matmul_attention_as_accurate_as_explicit():
    """Under bf16 autocast both paths round; the fast one may not round much worse (vs fp32)."""
    fused, explicit = pair(drop_path=0.1)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    ref_out, ref_grads = _run(explicit, x, y, False)
    (out_f, grads_f), (out_e, grads_e) = _run(fused, x, y, True), _run(explicit, x, y, True)

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    pairs = [("logits", out_f, out_e, ref_out)] + [(n, grads_f[n], grads_e[n], g) for n, g in ref_grads.items()]
    for name, fast, plain, ref in pairs:
        assert rel(fast, ref) < 5e-2, name
        assert rel(fast, ref) <= 2 * rel(plain, ref) + 5e-3, name


def test_optimize_casts_once_and_matches_fp32():
    fused, _ = pair()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = fused.eval()(x)
    model = vitlab.optimize(fused, torch.bfloat16)
    assert model is fused and not model.training
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in model.parameters())
    out = model(x)  # fp32 images are cast by the model; no grad graph without torch.no_grad()
    assert out.dtype == torch.bfloat16 and not out.requires_grad
    torch.testing.assert_close(out.float(), ref, atol=5e-2, rtol=5e-2)
    assert torch.equal(model.features(x)["logits"], out)
    with pytest.raises(ValueError, match="floating-point"):
        vitlab.optimize(model, torch.int8)


def test_fused_inference_kernels_match_eager_bf16(monkeypatch):
    from vitlab import accel as vit

    fusable = vit.fusable
    torch.manual_seed(0)
    model = tiny(depth=3)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = model.eval().forward_features(x)
    vitlab.optimize(model, torch.bfloat16)
    calls = []
    real = vit.fused_linear
    monkeypatch.setattr(vit, "fused_linear", lambda *a, **k: calls.append(k) or real(*a, **k))
    fused = model.forward_features(x)
    assert len(calls) == 3 * 4  # per block: qkv, attention output + residual, fc1 + GELU, fc2 + residual
    monkeypatch.setattr(vit, "fusable", lambda *a: False)
    eager = model.forward_features(x)
    rel = lambda a: ((a.float() - ref).norm() / ref.norm()).item()
    assert rel(fused) < 2e-2 and rel(fused) <= 1.5 * rel(eager)  # one rounding per kernel, not two or three
    # fp32, training and autograd keep the eager ops (but qkv, which has no dropout, in training without autograd)
    monkeypatch.setattr(vit, "fusable", fusable)
    calls.clear()
    model.train().forward_features(x)
    assert len(calls) == 3 and not any(calls)
    w = model.head.weight
    assert fusable(torch.ones(2, 2, dtype=torch.bfloat16), w) and not fusable(torch.ones(2, 2), w.float())
    with torch.enable_grad():
        assert not fusable(torch.ones(2, 2, dtype=torch.bfloat16, requires_grad=True), w)


def test_optimize_keeps_inspection_path():
    model = vitlab.optimize(tiny(), torch.bfloat16)
    x = model.embed(torch.randn(2, 3, 32, 32))
    w = model.blocks[0].attn.attention_weights(model.blocks[0].norm1(x))
    assert w.shape == (2, 4, 65, 65)
    torch.testing.assert_close(w.float().sum(-1), torch.ones(2, 4, 65), atol=2e-2, rtol=0)


# --- the benchmark harness (shape of the report only; nothing is timed against a bound) --

def test_bench_runs_every_variant_and_reports():
    pytest.importorskip("timm")
    pytest.importorskip("transformers")
    cases = (bench.Case(model="vit_mu4_32px", batch=2, dtype="bf16"),
             bench.Case(model="vit_mu4_32px", batch=4, dtype="fp32", train=True))
    report = bench.run(cases, rounds=1, target_s=0.0, threads=1, compile=False, memory=False, clock="cpu",
                       log=lambda m: None)
    targets = load_benchmark("speed/speed").format_targets(report.results)  # the project's, out of the library
    text = report.text + "\n#### Targets\n\n" + targets
    for name in ("vitlab", "timm", "timm TIMM_FUSED_ATTN=0", "timm autocast", "HF sdpa", "HF eager", "Targets",
                 "load average", "torch " + torch.__version__.split("+")[0]):
        assert name in text, name
    assert "train step batch 4 fp32" in report.text
    assert ">= 1.2x best peer | vit_mu4_32px inference batch 2 bf16" in targets
    assert "Targets" not in report.text and "not installed" not in report.text


def test_bench_times_vitlab_alone_without_the_peers(monkeypatch):
    monkeypatch.setattr(bench, "installed", lambda package: False)
    case = bench.Case(model="vit_mu4_32px", batch=2, dtype="bf16")
    report = bench.run((case,), rounds=1, target_s=0.0, threads=1, compile=False, memory=False, clock="cpu",
                       log=lambda m: None)
    assert [r.variant for r in report.results[0].rows] == ["vitlab"]
    assert "not installed, so not timed: timm, transformers" in report.text
    assert load_benchmark("speed/speed").format_targets(report.results).count("\n") == 1  # the header only


RUNTIMES_CHECK = """
import pytest
from vitlab import bench
cases = (bench.Case(model="vit_mu4_32px", batch=2, dtype="fp32"), bench.Case(model="vit_mu4_32px", batch=2, dtype="bf16"))
report = bench.run(cases, rounds=2, target_s=0.0, threads=1, compile=False, memory=False, runtimes=True,
                   log=lambda m: None)
fp32, bf16 = ([r.variant for r in res.rows] for res in report.results)
assert {"vitlab", "ORT", "OpenVINO"} <= set(fp32) and "ORT int8" not in fp32, fp32
assert {"vitlab", "OpenVINO", "vitlab int8", "ORT int8", "OpenVINO int8"} <= set(bf16), bf16
assert "onnxruntime 1." in report.text and "ms / iter (p50) | p90 |" in report.text, report.text
with pytest.raises(ValueError, match="cannot time ONNX Runtime"):
    bench.run(cases, rounds=1, target_s=0.0, threads=1, runtimes=True, clock="cpu", log=lambda m: None)
print("ok")
"""


def test_bench_times_the_runtimes_and_int8_paths():
    # In its own process: the runtimes' thread pools, left in a long test process, have made a later
    # subprocess start crash it (SIGSEGV right after vfork, seen only in the full suite).
    pytest.importorskip("onnxruntime")
    pytest.importorskip("openvino")
    out = subprocess.run([sys.executable, "-c", RUNTIMES_CHECK], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_bench_memory_probe_measures_rss():
    case = bench.Case(model="vit_mu4_32px", batch=2, dtype="bf16")
    rss = bench.measure_memory(case, "vitlab", threads=1, repeats=2)
    assert 50 * 2**20 < rss < 4 * 2**30  # torch alone is tens of MiB; a tiny model adds little


def test_bench_cli_rejects_unknown_case(capsys):
    from vitlab.cli import main

    assert main(["bench", "--cases", "no_such_case"]) == 2
    assert "no benchmark case matches" in capsys.readouterr().err
    assert main(["bench", "--quick", "--clock", "cpu"]) == 2  # CPU time needs --threads 1
    assert "threads=1" in capsys.readouterr().err
