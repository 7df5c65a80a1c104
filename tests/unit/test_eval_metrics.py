"""Evaluation metrics against closed forms (float64, seconds)."""

import math

import numpy as np
import pytest
import torch

from gfnalign.evaluation import metrics as M


def _rand_spd(d, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return a @ a.T + 0.1 * torch.eye(d, dtype=torch.float64)


def test_frechet_1d_closed_form():
    fd = M.frechet_distance(torch.tensor([1.0]), torch.tensor([[4.0]]), torch.tensor([-2.0]), torch.tensor([[9.0]]))
    assert fd == pytest.approx((1 + 2) ** 2 + (2 - 3) ** 2, abs=1e-12)


def test_frechet_diagonal_closed_form():
    a = torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64)
    b = torch.tensor([3.0, 0.5, 5.0], dtype=torch.float64)
    mu1 = torch.tensor([0.0, 1.0, 2.0])
    mu2 = torch.tensor([1.0, 1.0, -1.0])
    expected = float(((mu1 - mu2) ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum())
    assert M.frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_frechet_general_matches_scipy_sqrtm():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    c1, c2 = _rand_spd(5, 0), _rand_spd(5, 1)
    mu1, mu2 = torch.zeros(5), torch.ones(5)
    covmean = np.real(scipy_linalg.sqrtm(c1.numpy() @ c2.numpy()))
    expected = 5.0 + float(np.trace(c1.numpy()) + np.trace(c2.numpy()) - 2 * np.trace(covmean))
    assert M.frechet_distance(mu1, c1, mu2, c2) == pytest.approx(expected, rel=1e-8)


def test_frechet_identical_is_zero_and_symmetric():
    c = _rand_spd(6, 2)
    mu = torch.arange(6.0)
    assert M.frechet_distance(mu, c, mu, c) == pytest.approx(0.0, abs=1e-9)
    c2 = _rand_spd(6, 3)
    assert M.frechet_distance(mu, c, mu + 1, c2) == pytest.approx(M.frechet_distance(mu + 1, c2, mu, c), rel=1e-9)


def test_feature_frechet_identical_sets_zero_even_with_few_samples():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(4, 32, generator=g)  # n << d: singular sample covariance
    assert M.feature_frechet(f, f.clone()) == pytest.approx(0.0, abs=1e-8)


def test_feature_frechet_estimates_gaussian_distance():
    # n = 200000 samples in d = 2. Delta-method standard error of the estimate: the squared mean gap
    # contributes 2*|dmu|*sqrt(1+4)/sqrt(n) ≈ 0.010, the std gaps 2*|s_a-s_b|*sqrt((1+4)/(2n)) ≈ 0.007;
    # total ≈ 0.013, so 0.07 is about 5 standard errors.
    g = torch.Generator().manual_seed(1)
    n = 200000
    a = torch.randn(n, 2, generator=g, dtype=torch.float64)
    b = torch.randn(n, 2, generator=g, dtype=torch.float64) * torch.tensor([2.0, 0.5]) + torch.tensor([1.0, 0.0])
    expected = 1.0 + (1 - 2) ** 2 + (1 - 0.5) ** 2
    assert M.feature_frechet(a, b, shrinkage=0.0) == pytest.approx(expected, abs=0.07)


def test_shrinkage_regularises_rank_deficient_covariance():
    f = torch.randn(3, 10, generator=torch.Generator().manual_seed(2))
    gauss = M.feature_gaussian(f)
    assert bool((torch.linalg.eigvalsh(gauss.cov) > 0).all())
    plain = M.feature_gaussian(f, shrinkage=0.0, ridge=0.0)
    assert int(torch.linalg.matrix_rank(plain.cov)) <= 2
    with pytest.raises(ValueError, match="at least 2 samples"):
        M.feature_gaussian(f[:1])
    with pytest.raises(ValueError, match="shrinkage"):
        M.feature_gaussian(f, shrinkage=2.0)


def test_diversity_identical_samples_zero():
    f = torch.ones(5, 8) * torch.arange(8.0)
    for metric in ("cosine", "l2"):
        mean, per = M.diversity(f, metric=metric)
        assert mean == pytest.approx(0.0, abs=1e-7)
        assert per == {0: pytest.approx(0.0, abs=1e-7)}


def test_diversity_closed_form_per_prompt():
    # prompt 0: orthonormal basis vectors -> cosine distance 1 between every pair, L2 sqrt(2)
    # prompt 1: two points 3 apart on a line through the origin, same direction -> cosine 0, L2 3
    f = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 1.0, 1.0], [2.0, 2.0, 2.0]])
    f[4] = f[3] * (1 + 3 / math.sqrt(3))
    pid = torch.tensor([0, 0, 0, 1, 1])
    mean, per = M.diversity(f, pid, metric="cosine")
    assert per[0] == pytest.approx(1.0) and per[1] == pytest.approx(0.0, abs=1e-7)
    assert mean == pytest.approx(0.5)
    _, per = M.diversity(f, pid, metric="l2")
    assert per[0] == pytest.approx(math.sqrt(2)) and per[1] == pytest.approx(3.0)
    with pytest.raises(ValueError, match="metric"):
        M.diversity(f, pid, metric="manhattan")


def test_prior_drift_per_prompt_mean_and_errors():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(12, 4, generator=g)
    pid = torch.tensor([0] * 6 + [1] * 6)
    b = a.clone()
    b[pid == 1] += 2.0  # shifts prompt 1 only: FD = ||shift||^2 = 4 * 4
    mean, per = M.prior_drift(a, b, pid)
    assert per[0] == pytest.approx(0.0, abs=1e-8)
    assert per[1] == pytest.approx(16.0, rel=1e-6)
    assert mean == pytest.approx(8.0, rel=1e-6)
    with pytest.raises(ValueError, match="prompt ids differ"):
        M.prior_drift(a, b, pid, torch.zeros(12, dtype=torch.int64))


def test_reward_stats_and_clip_score():
    assert M.reward_stats([1.0, 3.0]) == (2.0, 1.0)
    with pytest.raises(ValueError, match="NaN"):
        M.reward_stats([1.0, float("nan")])
    s = M.clip_score(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
    assert s.tolist() == [100.0, 0.0]
