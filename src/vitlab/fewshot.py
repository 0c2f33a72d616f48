"""Few-shot linear evaluation on frozen features (the paper's protocol, as big_vision does it).

Per seed, k examples per class (nested across k); features standardised with the train
statistics, a constant bias column appended, and a closed-form ridge regression to
{-1, +1}^K targets solved through the smaller Gram matrix. The bias column is a constant 100
(as in big_vision) so that the bias is almost unregularised.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

BIAS_CONSTANT = 100.0
Probe = Literal["ridge", "logistic"]


def sample_shots(labels: torch.Tensor, max_shots: int, seed: int, num_classes: int | None = None) -> torch.Tensor:
    """Indices ``(K, max_shots)``: per class a seeded random order; the first k columns are the k-shot set."""
    num_classes = num_classes or int(labels.max()) + 1
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for c in range(num_classes):
        idx = torch.nonzero(labels == c).flatten()
        if len(idx) < max_shots:
            raise ValueError(
                f"class {c} has {len(idx)} training examples, fewer than the {max_shots} shots asked for; "
                f"use --shots with at most {len(idx)}"
            )
        rows.append(idx[torch.randperm(len(idx), generator=gen)[:max_shots]])
    return torch.stack(rows)


@dataclass
class RidgeClassifier:
    """Standardisation statistics and weights ``(D + 1, K)`` of a fitted ridge classifier."""

    mean: torch.Tensor
    std: torch.Tensor
    weights: torch.Tensor

    def _design(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.double() - self.mean) / self.std
        bias = torch.full((len(x), 1), BIAS_CONSTANT, dtype=x.dtype)
        return torch.cat([x, bias], dim=1)  # (N, D) -> (N, D + 1)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Class index per row of ``x`` (N, D)."""
        return (self._design(x) @ self.weights).argmax(dim=1)


def ridge_fit(x: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float = 1024.0) -> RidgeClassifier:
    """Closed-form ridge regression of ``x`` (N, D) onto {-1, +1}^K targets, bias column included."""
    x = x.double()
    mean, std = x.mean(0), x.std(0, unbiased=False) + 1e-5
    clf = RidgeClassifier(mean, std, torch.empty(0))
    a = clf._design(x)
    y = torch.full((len(x), num_classes), -1.0, dtype=x.dtype)
    y[torch.arange(len(x)), labels] = 1.0
    n, d = a.shape
    if n >= d:  # (A^T A + l2 I)^-1 A^T Y: a D x D solve
        clf.weights = torch.linalg.solve(a.T @ a + l2 * torch.eye(d, dtype=x.dtype), a.T @ y)
    else:  # A^T (A A^T + l2 I)^-1 Y: an N x N solve, the same solution
        clf.weights = a.T @ torch.linalg.solve(a @ a.T + l2 * torch.eye(n, dtype=x.dtype), y)
    return clf


@dataclass
class FewShotResult:
    """Accuracy per shot count over seeds."""

    shots: int
    accuracies: list[float]

    @property
    def mean(self) -> float:
        return sum(self.accuracies) / len(self.accuracies)

    @property
    def std(self) -> float:
        m = self.mean
        return math.sqrt(sum((a - m) ** 2 for a in self.accuracies) / len(self.accuracies))


def fewshot_eval(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    *,
    shots: list[int],
    seeds: int = 3,
    l2: float = 1024.0,
    num_classes: int | None = None,
    probe: Probe = "ridge",
) -> list[FewShotResult]:
    """Few-shot accuracy on ``test`` for each k in ``shots``, over ``seeds`` nested draws.

    ``probe``: the closed-form ridge classifier (the paper's), or a logistic-regression probe
    fitted on the same k-shot sets.
    """
    if probe not in ("ridge", "logistic"):
        raise ValueError(f"unknown probe {probe!r}; use 'ridge' or 'logistic'")
    num_classes = num_classes or int(max(train_y.max(), test_y.max())) + 1
    results = {k: FewShotResult(k, []) for k in shots}
    for seed in range(seeds):
        order = sample_shots(train_y, max(shots), seed, num_classes)
        for k in shots:
            idx = order[:, :k].flatten()
            if probe == "ridge":
                clf = ridge_fit(train_x[idx], train_y[idx], num_classes, l2)
                accuracy = (clf.predict(test_x) == test_y).double().mean().item()
            else:
                accuracy = logistic_probe(train_x[idx], train_y[idx], test_x, test_y, num_classes=num_classes)
            results[k].accuracies.append(accuracy)
    return [results[k] for k in shots]


def logistic_probe(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
    *, num_classes: int, weight_decay: float = 1e-4, steps: int = 100,
) -> float:
    """Accuracy of a multinomial logistic-regression probe (L-BFGS) on standardised features."""
    mean, std = train_x.mean(0), train_x.std(0, unbiased=False) + 1e-5
    xtr, xte = (train_x - mean) / std, (test_x - mean) / std
    linear = torch.nn.Linear(xtr.shape[1], num_classes)
    torch.nn.init.zeros_(linear.weight)
    torch.nn.init.zeros_(linear.bias)
    opt = torch.optim.LBFGS(linear.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(xtr), train_y) + weight_decay * linear.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (linear(xte).argmax(1) == test_y).float().mean().item()


# ---------------------------------------------------------------------------- a checkpoint on a data set

FEATURE_CACHE = "~/.cache/vitlab/features"


@dataclass
class FewShotReport:
    """Few-shot accuracy of one checkpoint's frozen features on one data set."""

    checkpoint: str
    data: str
    feature: str
    l2: float
    seeds: int
    eval_split: str
    num_classes: int
    num_test: int
    ridge: list[FewShotResult]
    logistic: list[FewShotResult] | None
    computed: dict[str, int]  # features computed per split; 0: all read from the cache
    classes: tuple[int, ...] = ()  # the data's classes evaluated (relabelled 0..k-1); (): all

    def to_dict(self) -> dict:
        """JSON-ready: the setting, and per k the mean, std and per-seed accuracies."""
        def rows(results: list[FewShotResult]) -> list[dict]:
            return [{"shots": r.shots, "mean": r.mean, "std": r.std, "accuracies": r.accuracies} for r in results]
        out = {k: v for k, v in vars(self).items() if k not in ("ridge", "logistic")}
        out["ridge"] = rows(self.ridge)
        if self.logistic is not None:
            out["logistic"] = rows(self.logistic)
        return out

    def table(self) -> str:
        """Accuracy (mean +- std over seeds) per number of shots, one row each."""
        head = (f"few-shot linear evaluation of {self.feature}: {self.num_classes} classes, {self.seeds} seed(s), "
                f"{self.num_test} {self.eval_split} images, ridge l2 {self.l2:g}")
        cols = ["ridge top-1"] + (["logistic top-1"] if self.logistic is not None else [])
        lines = [head, f"{'shots':>6}" + "".join(f"{c:>20}" for c in cols)]
        for i, r in enumerate(self.ridge):
            cells = [r] + ([self.logistic[i]] if self.logistic is not None else [])
            lines.append(f"{r.shots:>6}" + "".join(f"{f'{100 * c.mean:.2f} ± {100 * c.std:.2f}%':>20}" for c in cells))
        return "\n".join(lines)


def fewshot_checkpoint(
    checkpoint: str,
    data: str,
    *,
    shots: list[int],
    seeds: int = 3,
    feature: str = "pre_logits",
    l2: float = 1024.0,
    probe: Literal["logistic"] | None = None,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    cache_dir: str = FEATURE_CACHE,
    classes: tuple[int, ...] = (),
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> FewShotReport:
    """Few-shot evaluation of a model file or run directory on ``data``: k-shot sets drawn from
    its train split, accuracy on its test split (else val). ``probe="logistic"`` adds the
    logistic probe. ``classes``: only these classes of ``data``, relabelled 0..k-1 (as
    `DataConfig.classes`). Only the training images some seed draws go through the model; features
    are cached under ``cache_dir``."""
    from .config import as_pair
    from .data import DataConfig, build_data
    from .features import cache_key, cached_features, extract_features
    from .hub import load_model, model_file

    shots = list(dict.fromkeys(shots))
    if probe not in (None, "logistic"):
        raise ValueError(f"unknown probe {probe!r}; the ridge classifier always runs, --probe logistic adds a baseline")
    if not shots or min(shots) < 1:
        raise ValueError(f"shots must be positive numbers of examples per class, got {shots}")
    if seeds < 1:
        raise ValueError(f"seeds must be at least 1, got {seeds}")
    file = model_file(checkpoint)  # the features' cache key
    model = load_model(checkpoint, map_location=device).model
    h, w = as_pair(model.cfg.image_size)
    if h != w:
        raise ValueError(f"few-shot evaluation uses square images; the model takes {h}x{w}")
    data_cfg = DataConfig(path=data, image_size=h, mean=tuple(model.cfg.mean), std=tuple(model.cfg.std),
                          classes=tuple(classes))
    splits = build_data(data_cfg, log=log)
    eval_split, test = ("test", splits.test) if splits.test is not None else ("val", splits.val)
    if test is None:
        raise ValueError(f"{data} has only a training set; few-shot needs a test or val split to measure on "
                         f"(root/train/<class>/ with root/test/ or root/val/)")
    k = splits.num_classes
    train_y, test_y = splits.train.labels, test.labels
    # Every training example any seed draws (the k-shot sets are nested, so max(shots) covers all k).
    drawn = torch.cat([sample_shots(train_y, max(shots), s, k).flatten() for s in range(seeds)]).unique()

    computed: dict[str, int] = {}

    def features(split: str, dataset, indices: torch.Tensor) -> torch.Tensor:
        def compute(missing: torch.Tensor) -> torch.Tensor:
            return extract_features(model, dataset.subset(missing), data_cfg, feature=feature, batch_size=batch_size,
                                    device=device, progress=progress, log=log)
        key = cache_key(file, data_cfg, split, feature, dataset.labels)
        x, computed[split] = cached_features(key, cache_dir, indices, compute, log=log)
        return x

    drawn_x = features("train", splits.train, drawn)
    train_x = torch.zeros(len(train_y), drawn_x.shape[1])  # rows no seed draws are never read
    train_x[drawn] = drawn_x
    test_x = features(eval_split, test, torch.arange(len(test_y)))
    common = dict(shots=shots, seeds=seeds, l2=l2, num_classes=k)
    ridge = fewshot_eval(train_x, train_y, test_x, test_y, **common)
    logistic = fewshot_eval(train_x, train_y, test_x, test_y, probe="logistic", **common) if probe else None
    return FewShotReport(str(file), data, feature, l2, seeds, eval_split, k, len(test_y), ridge, logistic, computed,
                         tuple(classes))
