import pytest
import torch

import vitlab
from vitlab.optim import OptimConfig, build_optimizer, lr_at, param_groups, update_ema


def tiny():
    return vitlab.create_model("vit_mu4_32px", width=32, depth=2, mlp_dim=64, num_heads=2)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_schedule_warmup_and_decay_end_where_they_should(schedule):
    peak, warmup, total = 0.1, 10, 100
    lrs = [lr_at(s, peak=peak, warmup=warmup, total=total, schedule=schedule, min_ratio=0.1) for s in range(total)]
    assert lrs[0] == pytest.approx(peak / warmup)
    assert all(a < b for a, b in zip(lrs[:warmup - 1], lrs[1:warmup]))  # rising through the warm-up
    assert lrs[warmup - 1] == pytest.approx(peak)  # the last warm-up step reaches the peak
    assert all(a >= b for a, b in zip(lrs[warmup - 1:], lrs[warmup:]))  # then never rises again
    assert lrs[warmup] < peak
    assert lrs[-1] == pytest.approx(peak * 0.1)  # the decay ends exactly at the last step
    half_way = warmup - 1 + (total - warmup) // 2  # both shapes pass the mean of peak and end here
    assert lrs[half_way] == pytest.approx(peak * (0.1 + 0.9 * 0.5), rel=1e-6)


def test_linear_and_cosine_differ_and_constant_stays():
    kw = dict(peak=1.0, warmup=0, total=10)
    assert lr_at(2, **kw, schedule="linear") == pytest.approx(0.7)
    assert lr_at(2, **kw, schedule="cosine") > 0.7
    assert [lr_at(s, **kw, schedule="constant") for s in range(10)] == [1.0] * 10


def test_warmup_fraction_and_lr_scaling():
    cfg = OptimConfig(lr=1e-3, lr_batch_size=4096, warmup_fraction=0.05)
    assert cfg.peak_lr(512) == pytest.approx(1e-3 / 8)
    assert cfg.warmup(1000) == 50
    assert OptimConfig(warmup_steps=10_000).warmup(500) == 50  # shorter than its warm-up: a tenth, then the decay
    with pytest.raises(ValueError, match="not both"):
        OptimConfig(warmup_steps=10, warmup_fraction=0.1)


def test_param_groups_exclude_biases_norms_posemb_and_class_token():
    model = tiny()
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert {"pos_embed", "cls_token", "norm.weight", "norm.bias", "head.bias", "blocks.0.norm1.weight",
            "blocks.1.attn.qkv.bias"} <= no_decay_names
    assert all(n.endswith("weight") and "norm" not in n for n in decay_names)
    assert {"patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "head.weight"} <= decay_names
    assert decay_names.isdisjoint(no_decay_names)
    assert len(decay_names) + len(no_decay_names) == len(list(model.parameters()))
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)


def test_adamw_decay_is_decoupled_and_skips_no_decay_params():
    model = tiny()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, OptimConfig(optimizer="adamw", lr=0.1, weight_decay=0.5))
    assert opt.defaults["fused"] and opt.defaults["betas"] == (0.9, 0.999)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # no gradient: only the decay moves the weights
    opt.step()
    for n, p in model.named_parameters():
        decays = p.ndim > 1 and n not in ("pos_embed", "cls_token")
        expected = before[n] * (1 - 0.1 * 0.5) if decays else before[n]
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=0)


def test_sgd_has_momentum():
    opt = build_optimizer(tiny(), OptimConfig(optimizer="sgd", lr=0.1))
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9 and opt.defaults["fused"]


def test_update_ema():
    model, ema = tiny(), tiny()
    torch.nn.init.normal_(model.head.weight)
    old = ema.head.weight.detach().clone()
    update_ema(ema, model, 0.9)
    torch.testing.assert_close(ema.head.weight, 0.9 * old + 0.1 * model.head.weight.detach())


def test_update_ema_copies_batchnorm_statistics():
    model, ema = torch.nn.BatchNorm1d(4), torch.nn.BatchNorm1d(4)
    model(torch.randn(8, 4) + 3.0)  # training mode: the running statistics move
    update_ema(ema, model, 0.99)
    torch.testing.assert_close(ema.running_mean, model.running_mean)
    assert ema.num_batches_tracked == 1
