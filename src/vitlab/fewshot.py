"""Few-shot linear evaluation on frozen features (the paper's protocol, as big_vision does it).

Per seed, k examples per class (nested across k); features standardised with the train
statistics, a constant bias column appended, and a closed-form ridge regression to
{-1, +1}^K targets solved through the smaller Gram matrix. The bias column is a constant 100
(as in big_vision) so that the bias is almost unregularised.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

BIAS_CONSTANT = 100.0


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
) -> list[FewShotResult]:
    """Ridge few-shot accuracy on ``test`` for each k in ``shots``, over ``seeds`` nested draws."""
    num_classes = num_classes or int(max(train_y.max(), test_y.max())) + 1
    results = {k: FewShotResult(k, []) for k in shots}
    for seed in range(seeds):
        order = sample_shots(train_y, max(shots), seed, num_classes)
        for k in shots:
            idx = order[:, :k].flatten()
            clf = ridge_fit(train_x[idx], train_y[idx], num_classes, l2)
            results[k].accuracies.append((clf.predict(test_x) == test_y).double().mean().item())
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
