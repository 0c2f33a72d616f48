import numpy as np
import pytest
import torch

from vitlab.fewshot import BIAS_CONSTANT, fewshot_eval, logistic_probe, ridge_fit, sample_shots


def direct_solution(x, labels, num_classes, l2):
    """Normal equations of the ridge problem, solved with numpy, independent of vitlab."""
    x = x.double().numpy()
    x = (x - x.mean(0)) / (x.std(0) + 1e-5)
    a = np.concatenate([x, np.full((len(x), 1), BIAS_CONSTANT)], axis=1)
    y = -np.ones((len(x), num_classes))
    y[np.arange(len(x)), labels.numpy()] = 1
    return np.linalg.solve(a.T @ a + l2 * np.eye(a.shape[1]), a.T @ y)


@pytest.mark.parametrize("n, d", [(200, 16), (12, 64)])  # N >= D and N < D (the Gram-matrix branch)
def test_ridge_equals_normal_equations(n, d):
    torch.manual_seed(0)
    x, labels = torch.randn(n, d), torch.randint(0, 4, (n,))
    clf = ridge_fit(x, labels, 4, l2=3.0)
    assert np.allclose(clf.weights.numpy(), direct_solution(x, labels, 4, 3.0), atol=1e-8)


def test_shots_are_nested_balanced_and_seeded():
    labels = torch.arange(5).repeat(30)
    order = sample_shots(labels, 10, seed=1)
    assert order.shape == (5, 10)
    for c in range(5):
        assert (labels[order[c]] == c).all() and len(set(order[c].tolist())) == 10
    assert torch.equal(order, sample_shots(labels, 10, seed=1))
    assert not torch.equal(order, sample_shots(labels, 10, seed=2))
    assert torch.equal(sample_shots(labels, 5, seed=1), order[:, :5])  # nested: 5-shot is a prefix of 10-shot


def test_too_many_shots_is_a_clear_error():
    labels = torch.tensor([0, 0, 0, 1, 1])
    with pytest.raises(ValueError, match="class 1 has 2 training examples, fewer than the 3 shots"):
        sample_shots(labels, 3, seed=0)


def test_fewshot_learns_separable_classes():
    torch.manual_seed(0)
    centres = torch.randn(3, 8) * 4
    train_y, test_y = torch.arange(3).repeat(40), torch.arange(3).repeat(20)
    train_x = centres[train_y] + torch.randn(120, 8)
    test_x = centres[test_y] + torch.randn(60, 8)
    results = fewshot_eval(train_x, train_y, test_x, test_y, shots=[1, 10], seeds=3, l2=1.0)
    assert [r.shots for r in results] == [1, 10]
    assert all(len(r.accuracies) == 3 for r in results)
    assert results[1].mean > 0.9
    assert logistic_probe(train_x, train_y, test_x, test_y, num_classes=3) > 0.9
