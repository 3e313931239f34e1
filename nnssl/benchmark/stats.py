"""Statistics of ``nnssl_benchmark_ssl``: paired t interval, Holm's correction, seeds needed (numpy + scipy, no torch).

The comparison of a pretrained start with scratch is paired by seed (same training cases, same
seeded augmentation and initialization of the layers not transferred). With k seeds and the k
differences d = pretrained - scratch, the test is the **paired t test**: the 95 % confidence
interval of the mean difference is mean(d) ± t(0.975, k − 1) · std(d, ddof 1) / √k (Student's
t distribution with k − 1 degrees of freedom). Why not a sign-flip permutation test: with k = 3
its smallest two-sided p-value is 2 / 2³ = 0.25, so it could never give a verdict at the seed
counts a benchmark can afford.

Verdict of one comparison: "helps" / "hurts" only when the interval excludes 0 (equivalently
p < 0.05); else "within noise". Fewer than 3 seeds: "too few seeds" (with 2 seeds the interval
is mean ± 12.7 standard errors and the spread itself is one number). Differences with zero
spread (every seed gave the same difference) have a zero-width interval: a nonzero difference
is a verdict, an all-zero one is "within noise".
"""
from typing import List, Optional, Sequence

import numpy as np

MIN_SEEDS = 3
ALPHA = 0.05
POWER = 0.8  # of seeds_needed
MAX_SEEDS = 10000  # seeds_needed gives up beyond this (the difference is tiny against the noise)


def paired_stats(pretrained: Sequence[float], scratch: Sequence[float]) -> dict:
    """Means/stds (ddof 1; 0 for one value) of both, the paired difference pretrained − scratch,
    its standard error, the 95 % t interval ``ci95: (lo, hi)``, the two-sided ``p`` value and the
    verdict (see the module docstring).
    With fewer than 2 pairs the interval is (-inf, inf) and p = 1."""
    from scipy import stats

    p, s = np.asarray(pretrained, float), np.asarray(scratch, float)
    if p.shape != s.shape or p.ndim != 1 or p.size == 0:
        raise ValueError("paired_stats needs the same, non-zero number of pretrained and scratch values")
    d = p - s
    k = d.size
    std = lambda v: float(v.std(ddof=1)) if v.size > 1 else 0.0  # noqa: E731
    mean, sd = float(d.mean()), std(d)
    if k < 2:
        ci, pval = (-np.inf, np.inf), 1.0
    elif sd == 0.0:  # every seed the same difference: the t statistic is 0 or infinite
        ci, pval = (mean, mean), (1.0 if mean == 0.0 else 0.0)
    else:
        se = sd / np.sqrt(k)
        half = float(stats.t.ppf(1 - ALPHA / 2, k - 1)) * se
        ci = (mean - half, mean + half)
        pval = float(2 * stats.t.sf(abs(mean) / se, k - 1))
    return {"k": k, "pretrained_mean": float(p.mean()), "pretrained_std": std(p), "scratch_mean": float(s.mean()),
            "scratch_std": std(s), "diff_mean": mean, "diff_std": sd,
            "diff_se": float(sd / np.sqrt(k)) if k > 1 else float("inf"), "ci95": (float(ci[0]), float(ci[1])),
            "p": pval, "verdict": verdict(mean, pval, k)}


def verdict(mean: float, p: float, k: int, alpha: float = ALPHA) -> str:
    if k < MIN_SEEDS:
        return "too few seeds"
    if p < alpha:
        return "helps" if mean > 0 else "hurts"
    return "within noise"


def holm(p_values: Sequence[float]) -> List[float]:
    """Holm's step-down adjusted p-values (same order as given): the i-th smallest p times
    (m − i), made monotone and capped at 1. Rejecting where adjusted p < α keeps the chance of
    any false verdict among the m comparisons at most α (family-wise error rate)."""
    p = np.asarray(p_values, float)
    m = p.size
    order = np.argsort(p, kind="stable")
    adjusted = np.empty(m)
    running = 0.0
    for i, j in enumerate(order):
        running = max(running, min(1.0, (m - i) * p[j]))
        adjusted[j] = running
    return [float(v) for v in adjusted]


def seeds_needed(mean: float, sd: float, alpha: float = ALPHA, power: float = POWER) -> Optional[int]:
    """Seeds a paired t test needs to find a true mean difference ``mean`` with spread ``sd``
    (std of the differences) with probability ``power`` at two-sided level ``alpha``: the
    smallest k ≥ 3 whose power, from the noncentral t distribution (df k − 1, noncentrality
    mean/sd · √k), reaches ``power`` (power grows with k). None: no number of seeds (a difference of 0) or more than
    MAX_SEEDS. Not corrected for multiple comparisons."""
    from scipy import stats

    if mean == 0.0 or not np.isfinite(mean) or not np.isfinite(sd):
        return None
    if sd == 0.0:
        return MIN_SEEDS
    effect = abs(mean) / sd

    def achieved(k: int) -> float:
        crit = stats.t.ppf(1 - alpha / 2, k - 1)
        nc = effect * np.sqrt(k)
        return float(stats.nct.sf(crit, k - 1, nc) + stats.nct.cdf(-crit, k - 1, nc))

    # start at the normal approximation ((z(1 - alpha/2) + z(power)) / effect)^2, then step to the exact k
    k = max(MIN_SEEDS, int(np.ceil(((stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)) / effect) ** 2)))
    if k > MAX_SEEDS:
        return None
    while achieved(k) < power:
        if k >= MAX_SEEDS:
            return None
        k += 1
    while k > MIN_SEEDS and achieved(k - 1) >= power:
        k -= 1
    return k


def iterations_to_threshold(val_dice: Sequence[float], iterations_per_epoch: int, threshold: float) -> Optional[int]:
    """Training iterations done when the per-epoch validation Dice first reaches ``threshold`` (None: never)."""
    for epoch, d in enumerate(val_dice):
        if d is not None and np.isfinite(d) and d >= threshold:
            return (epoch + 1) * int(iterations_per_epoch)
    return None
