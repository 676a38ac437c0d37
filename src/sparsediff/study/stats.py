"""Grouping a study's results into settings, their statistics over seeds, and the verdicts.

A *setting* is (dataset, row, p, sparsity), aggregated over seeds as mean and sample standard
deviation (``Stat``; the std needs >= 2 seeds); its row is the cell's variant (``small-dense``,
``rigl-channel``) or else its method. Settings at sparsity 0 other than dense are *baselines*.

Two settings are compared by a two-sided Welch t-test on their per-seed values at ``ALPHA``
(5%), when both have >= 2 seeds: one *beats* the other when its mean is lower and p < 5%, is
*worse* when higher and p < 5%, and otherwise *matches* it (the difference is within the seed
noise; with 3 seeds only large differences are detectable). A claim tests several settings at
once, so the report also states its verdict with Holm's correction (``holm``), which keeps the
chance of any false "beyond the noise" in the claim at 5%. A sparse setting is *safe* when it is
not worse than dense. With a single seed on either side there is no test: the tolerance is the
known standard deviation, or ``rel_tol`` (``REL_TOL``, 5%) of the dense mean, and the verdict
is weak. ``sample_sizes``
collects the FID sample counts and seed counts behind a dataset's numbers, for the report's
titles and small-sample warning.
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

METHOD_NAMES = {"dense": "Dense", "static": "Static", "rigl": "RigL", "magran": "MagRan"}
VARIANT_NAMES = {
    "small-dense": "Small dense",
    "rigl-channel": "RigL channel",
    "rigl-channel-tied": "RigL channel, stream tied",
    "rigl-channel-tied-2x": "RigL channel, stream tied, 2x steps",
    "rigl-unit": "RigL unit",
    "chase": "Chase",
    "small-dense-time": "Small dense, equal time",
}
REL_TOL = 0.05
ALPHA = 0.05
POWER = 0.8  # of the smallest detectable difference printed beside every "matches"
MISSING = "–"
# Below this many generated or reference images FID is strongly biased by n and noisy
# (docs/evaluation.md, "Sample counts"): a few FID points between settings mean nothing.
MIN_FID_SAMPLES = 1000


@dataclass(frozen=True)
class Stat:
    """Mean and sample std over seeds; std is None below two values."""

    mean: float | None
    std: float | None
    n: int

    @classmethod
    def of(cls, values: Iterable[Any]) -> Stat:
        """Summarize the numeric, finite values (others are ignored)."""
        xs = [float(v) for v in values if _number(v)]
        if not xs:
            return cls(None, None, 0)
        return cls(statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else None, len(xs))

    def format(self, digits: int = 2, scale: float = 1.0, n_full: int = 0) -> str:
        """``12.34 ± 0.56``; ``12.34`` with one seed; ``(n=k)`` when fewer seeds than others."""
        if self.mean is None:
            return MISSING
        text = f"{self.mean * scale:.{digits}f}"
        if self.std is not None:
            text += f" ± {self.std * scale:.{digits}f}"
        if self.n < n_full:
            text += f" (n={self.n})"
        return text


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def welch_p(a: Stat, b: Stat) -> float | None:
    """Two-sided p-value of Welch's t-test on the seeds summarised by ``a`` and ``b`` (mean,
    sample std, n); None below two seeds on either side. Both without spread: 1 for equal means,
    0 for different ones."""
    if a.n < 2 or b.n < 2:
        return None
    if not a.std and not b.std:
        return 1.0 if a.mean == b.mean else 0.0
    from scipy.stats import ttest_ind_from_stats

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        test = ttest_ind_from_stats(a.mean, a.std, a.n, b.mean, b.std, b.n, equal_var=False)
    return float(test.pvalue)


def welch_p_above(a: Stat, b: Stat) -> float | None:
    """One-sided p-value of Welch's t-test that ``a``'s mean is above ``b``'s (e.g. an FID
    worse than dense's): half the two-sided p where ``a`` is higher, one minus that where not;
    None below two seeds on either side."""
    p = welch_p(a, b)
    if p is None:
        return None
    return p / 2 if a.mean > b.mean else 1 - p / 2


def detectable_difference(
    a: Stat, b: Stat, alpha: float = ALPHA, power: float = POWER, draws: int = 20_000
) -> float | None:
    """The smallest difference of means that the two-sided Welch t-test at ``alpha`` finds
    with probability ``power``, for seeds drawn from normals with these counts and spreads
    (None below two seeds on either side).

    Measured by simulating the test itself (``draws`` seeded studies, the same draws for every
    difference, so the power rises smoothly with it) rather than by the noncentral-t formula,
    which with 3 seeds overstates the power of Welch's estimated degrees of freedom (0.70
    where it promises 0.80). What a "matches" can and cannot rule out: a smaller gap would
    usually go unseen.
    """
    if a.n < 2 or b.n < 2 or a.std is None or b.std is None:
        return None
    if not a.std and not b.std:
        return 0.0
    import numpy as np
    from scipy.optimize import brentq
    from scipy.stats import t

    rng = np.random.default_rng(0)
    xa, xb = rng.standard_normal((draws, a.n)) * a.std, rng.standard_normal((draws, b.n)) * b.std
    va, vb = xa.var(axis=1, ddof=1) / a.n, xb.var(axis=1, ddof=1) / b.n
    se = np.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (a.n - 1) + vb**2 / (b.n - 1))
    crit = t.ppf(1 - alpha / 2, df) * se  # each draw finds a difference beyond this
    offset = xb.mean(axis=1) - xa.mean(axis=1)

    def shortfall(d: float) -> float:  # power at a true difference d, minus the target
        return float(np.mean(np.abs(offset + d) > crit)) - power

    high = float(np.sqrt(a.std**2 / a.n + b.std**2 / b.n))
    while shortfall(high) < 0:
        high *= 2
    return float(brentq(shortfall, 0.0, high, xtol=1e-6 * high))


VERDICTS = ("agree", "partly", "mixed", "cannot tell", "leans against", "disagree")


def verdict_word(for_: int, against: int, within: int) -> str:
    """One word for a claim from its tests: how many went its way beyond the noise, against
    it beyond the noise, and neither (within the noise, or untested). Symmetric: swapping
    ``for_`` and ``against`` swaps agree/disagree and partly/leans against."""
    if for_ and against:
        return "mixed"
    if for_:
        return "agree" if not within else "partly"
    if against:
        return "disagree" if not within else "leans against"
    return "cannot tell"


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the given order: the i-th smallest of ``m`` is
    multiplied by ``m - i`` (i from 0), then made non-decreasing and capped at 1. An adjusted
    p < ALPHA rejects with a family-wise error rate of ALPHA over all ``m`` tests."""
    m, adjusted, running = len(p_values), [0.0] * len(p_values), 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda j: p_values[j])):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


@dataclass(frozen=True)
class Comparison:
    """``value`` against ``reference`` (lower is better): a Welch test when both have >= 2
    seeds, else the tolerance rule, marked weak."""

    value: Stat
    reference: Stat
    p_value: float | None
    tolerance: float | None
    rule: str

    @classmethod
    def of(cls, value: Stat, reference: Stat, rel_tol: float = REL_TOL) -> Comparison:
        """Compare two statistics (both must have a mean)."""
        p = welch_p(value, reference)
        if p is not None:
            return cls(value, reference, p, None, f"Welch t-test, p = {p:.3f}")
        known = [s for s in (reference.std, value.std) if s is not None]
        if known:
            return cls(value, reference, None, max(known), "seed spread, no test")
        tol = rel_tol * abs(reference.mean)
        return cls(value, reference, None, tol, f"{rel_tol:.0%} of the reference, no spread")

    @property
    def weak(self) -> bool:
        """No test: a single seed on either side."""
        return self.p_value is None

    @property
    def lower(self) -> bool:
        """Lower beyond the noise."""
        if self.p_value is not None:
            return self.p_value < ALPHA and self.value.mean < self.reference.mean
        return self.value.mean < self.reference.mean - self.tolerance

    @property
    def higher(self) -> bool:
        """Higher beyond the noise."""
        if self.p_value is not None:
            return self.p_value < ALPHA and self.value.mean > self.reference.mean
        return self.value.mean > self.reference.mean + self.tolerance

    @property
    def word(self) -> str:
        """``beats``, ``matches`` or ``worse than``."""
        return "beats" if self.lower else "worse than" if self.higher else "matches"

    @property
    def detectable(self) -> float | None:
        """The smallest difference this test would have found (80% power): None untested."""
        return None if self.weak else detectable_difference(self.value, self.reference)

    @property
    def explained(self) -> str:
        """The rule, and beside a tested "matches" the smallest difference it could see."""
        text = (
            self.rule if self.tolerance is None else f"tolerance {self.tolerance:.2f}, {self.rule}"
        )
        if self.word == "matches" and self.detectable is not None:
            text += f"; could detect ≥ {self.detectable:.2f}"
        return text


@dataclass
class Setting:
    """One (dataset, row, p, sparsity) and its records, one per seed; ``method`` holds the
    row's name (a cell's variant, else its method)."""

    dataset: str
    method: str
    prune_ratio: float | None
    sparsity: float
    records: list[dict] = field(default_factory=list)

    @property
    def row(self) -> tuple[str, float | None]:
        """The table row this setting belongs to."""
        return (self.method, self.prune_ratio)

    @property
    def label(self) -> str:
        """``RigL (p=0.05) at 50%``."""
        base = row_label(*self.row)
        return base if self.sparsity == 0 else f"{base} at {pct(self.sparsity)}"

    def metric(self, name: str, source: str = "metrics") -> Stat:
        """A metric over seeds (``source``: the records' ``metrics`` or, e.g.,
        ``metrics_vs_reconstructions``)."""
        return Stat.of((r.get(source) or {}).get(name) for r in self.records)

    def cost(self, key: str) -> Stat:
        """A cost over seeds."""
        return Stat.of((r.get("cost") or {}).get(key) for r in self.records)

    def cost_ratio(self, key: str, dense_key: str) -> Stat:
        """cost[key] / cost[dense_key] over seeds."""
        values = []
        for r in self.records:
            cost = r.get("cost") or {}
            if _number(cost.get(key)) and _number(cost.get(dense_key)) and cost[dense_key]:
                values.append(cost[key] / cost[dense_key])
        return Stat.of(values)

    def sample_record(self) -> dict:
        """The record of the lowest seed (seed 0 normally), whose sample grid is shown."""
        return min(self.records, key=lambda r: r.get("seed", 0))


@dataclass(frozen=True)
class SampleSizes:
    """The distinct FID sample counts and seed counts behind one dataset's numbers."""

    generated: tuple[int, ...]
    reference: tuple[int, ...]
    seeds: tuple[int, ...]  # seeds per setting

    @property
    def small(self) -> bool:
        """Some FID rests on fewer than MIN_FID_SAMPLES generated or reference images."""
        return any(n < MIN_FID_SAMPLES for n in self.generated + self.reference)

    def describe(self) -> str:
        """``n = 64 generated vs 128 reference images, 2 seeds``."""
        gen, ref = span(self.generated), span(self.reference)
        seeds = span(self.seeds)
        seeds += " seed" if self.seeds == (1,) else " seeds"
        if not self.generated:
            return f"sample counts not recorded, {seeds}"
        if not self.reference:
            return f"n = {gen} generated images (reference size not recorded), {seeds}"
        return f"n = {gen} generated vs {ref} reference images, {seeds}"


def span(values: tuple[int, ...]) -> str:
    """(64,) -> ``64``; (64, 1000) -> ``64–1000``."""
    if not values:
        return MISSING
    lo, hi = min(values), max(values)
    return f"{lo}" if lo == hi else f"{lo}–{hi}"


def sample_sizes(settings: list[Setting]) -> SampleSizes:
    """FID sample counts as measured (metrics num_fake/num_real), else as planned (protocol)."""
    generated, reference = set(), set()
    for s in settings:
        for r in s.records:
            metrics, protocol = r.get("metrics") or {}, r.get("protocol") or {}
            ref = protocol.get("reference")
            fake = metrics.get("num_fake", protocol.get("num_samples"))
            real = metrics.get("num_real", ref.get("size") if isinstance(ref, dict) else None)
            generated |= {int(fake)} if _number(fake) else set()
            reference |= {int(real)} if _number(real) else set()
    seeds = {len(s.records) for s in settings}
    return SampleSizes(tuple(sorted(generated)), tuple(sorted(reference)), tuple(sorted(seeds)))


def pct(sparsity: float) -> str:
    """0.25 -> ``25%``."""
    return f"{sparsity * 100:g}%"


def row_label(method: str, prune_ratio: float | None) -> str:
    """``Dense``, ``Static``, ``RigL (p=0.05)``, ``Small dense``."""
    name = METHOD_NAMES.get(method) or VARIANT_NAMES.get(method, method)
    return name if prune_ratio is None else f"{name} (p={prune_ratio:g})"


def row_order(row: tuple[str, float | None]) -> tuple:
    """Sort key of table rows: Dense, Static, RigL, MagRan (then others), each by p."""
    method, p = row
    rank = list(METHOD_NAMES).index(method) if method in METHOD_NAMES else len(METHOD_NAMES)
    return (rank, method, p if p is not None else -1.0)


def group_settings(records: list[dict]) -> dict[str, list[Setting]]:
    """Records -> settings per dataset, in table order (row, then sparsity)."""
    groups: dict[str, dict[tuple, Setting]] = {}
    for r in records:
        p = r.get("prune_ratio")
        key = (r.get("variant") or r["method"], p, float(r.get("sparsity") or 0.0))
        by_key = groups.setdefault(r["dataset"], {})
        by_key.setdefault(key, Setting(r["dataset"], key[0], p, key[2])).records.append(r)
    return {
        ds: sorted(by_key.values(), key=lambda s: (row_order(s.row), s.sparsity))
        for ds, by_key in groups.items()
    }


def split_dense(settings: list[Setting]) -> tuple[Setting | None, list[Setting]]:
    """The dense setting (None without one) and the sparse settings."""
    dense = [s for s in settings if s.method == "dense"]
    return (dense[0] if dense else None), [s for s in settings if s.sparsity > 0]


def baselines(settings: list[Setting]) -> list[Setting]:
    """Settings at sparsity 0 other than dense (e.g. a small-dense model)."""
    return [s for s in settings if s.sparsity == 0 and s.method != "dense"]


@dataclass(frozen=True)
class Verdict:
    """Whether a sparse setting matches, beats or is worse than dense (see the module doc)."""

    setting: Setting
    comparison: Comparison

    @property
    def fid(self) -> Stat:
        """The setting's FID."""
        return self.comparison.value

    @property
    def dense(self) -> Stat:
        """Dense FID."""
        return self.comparison.reference

    @property
    def safe(self) -> bool:
        """Not worse than dense beyond the noise."""
        return not self.comparison.higher

    @property
    def beats(self) -> bool:
        """Better than dense beyond the noise."""
        return self.comparison.lower

    @property
    def weak(self) -> bool:
        """A single seed on either side: no test."""
        return self.comparison.weak

    def describe(self) -> str:
        """``RigL (p=0.05) at 50%: FID 9.50 ± 0.71 vs dense 11.00 ± 1.41, matches dense (...)``."""
        c = self.comparison
        how = {"beats": "beats dense", "matches": "matches dense"}.get(c.word, "worse than dense")
        weak = "; weak: single seed" if self.weak else ""
        return (
            f"{self.setting.label}: FID {self.fid.format()} vs dense {self.dense.format()}, "
            f"{how} ({c.explained}{weak})"
        )


def judge(
    setting: Setting, dense: Stat, rel_tol: float = REL_TOL, source: str = "metrics"
) -> Verdict | None:
    """The verdict of one sparse setting against dense (FIDs of the records' ``source``); None
    without both FIDs."""
    fid = setting.metric("fid", source)
    if fid.mean is None or dense.mean is None:
        return None
    return Verdict(setting, Comparison.of(fid, dense, rel_tol))


def safe_values(records: list[dict], rel_tol: float = REL_TOL) -> dict[str, list[Verdict]]:
    """Verdicts for every sparse setting, per dataset (``[v for v in ... if v.safe]`` = safe)."""
    out = {}
    for ds, settings in group_settings(records).items():
        dense, sparse = split_dense(settings)
        if dense is None:
            continue
        verdicts = [judge(s, dense.metric("fid"), rel_tol) for s in sparse]
        out[ds] = [v for v in verdicts if v is not None]
    return out


@dataclass(frozen=True)
class PComparison:
    """Smallest vs largest p of one dynamic method at the highest sparsity having both."""

    dataset: str
    method: str
    sparsity: float
    p_low: float
    p_high: float
    low: Stat
    high: Stat

    @property
    def low_better(self) -> bool:
        """The smaller p has the lower mean FID."""
        return self.low.mean < self.high.mean

    @property
    def p_value(self) -> float | None:
        """Welch t-test of the two p values' FIDs; None with a single seed on either side."""
        return welch_p(self.low, self.high)

    @property
    def conclusive(self) -> bool:
        """The gap is beyond the noise by a Welch t-test (never with single seeds)."""
        p = self.p_value
        return p is not None and p < ALPHA

    def describe(self) -> str:
        """A sentence stating which p is better, and how firmly."""
        head = (
            f"{row_label(self.method, None)} at {pct(self.sparsity)}: "
            f"p = {self.p_low:g} gives FID {self.low.format()}, p = {self.p_high:g} gives "
            f"{self.high.format()}; "
        )
        if self.low.mean == self.high.mean:
            return head + "a tie."
        win, lose = (self.p_low, self.p_high) if self.low_better else (self.p_high, self.p_low)
        p = self.p_value
        detectable = detectable_difference(self.low, self.high)
        within = f"within the noise, Welch t-test p = {p:.3f}" if p is not None else ""
        if within and detectable is not None:
            within += f"; could detect ≥ {detectable:.2f}"
        firm = (
            f"Welch t-test p = {p:.3f}, beyond the noise"
            if self.conclusive
            else "not conclusive: " + (within or "single seed")
        )
        return head + f"p = {win:g} is better than p = {lose:g} ({firm})."


def compare_prune_ratios(records: list[dict], source: str = "metrics") -> list[PComparison]:
    """For each dataset and dynamic method, compare p values at the highest shared sparsity
    (FIDs of the records' ``source``)."""
    out = []
    for ds, settings in group_settings(records).items():
        by_method: dict[str, dict[float, dict[float, Stat]]] = {}
        for s in settings:
            fid = s.metric("fid", source)
            if s.prune_ratio is not None and fid.mean is not None:
                by_method.setdefault(s.method, {}).setdefault(s.sparsity, {})[s.prune_ratio] = fid
        for method, by_sparsity in by_method.items():
            shared = [sp for sp, by_p in by_sparsity.items() if len(by_p) >= 2]
            if not shared:
                continue
            sparsity = max(shared)
            by_p = by_sparsity[sparsity]
            lo, hi = min(by_p), max(by_p)
            out.append(PComparison(ds, method, sparsity, lo, hi, by_p[lo], by_p[hi]))
    return out
