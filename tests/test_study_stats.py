"""Golden values of the verdict rule and of the smallest detectable difference."""

import numpy as np
import pytest
from scipy.stats import ttest_ind

from sparsediff.study.stats import Stat, detectable_difference, verdict_word


@pytest.mark.parametrize(
    "for_, against, within, word",
    [
        (3, 0, 0, "agree"),
        (1, 0, 2, "partly"),
        (1, 1, 1, "mixed"),
        (2, 1, 0, "mixed"),
        (0, 0, 3, "cannot tell"),
        (0, 0, 0, "cannot tell"),
        (0, 1, 2, "leans against"),
        (0, 3, 0, "disagree"),
    ],
)
def test_verdict_words(for_, against, within, word):
    assert verdict_word(for_, against, within) == word


MIRROR = {"agree": "disagree", "partly": "leans against", "mixed": "mixed"}
MIRROR |= {v: k for k, v in MIRROR.items()} | {"cannot tell": "cannot tell"}


@pytest.mark.parametrize("for_", range(4))
@pytest.mark.parametrize("against", range(4))
@pytest.mark.parametrize("within", range(3))
def test_the_verdict_rule_reads_the_same_both_ways(for_, against, within):
    assert verdict_word(against, for_, within) == MIRROR[verdict_word(for_, against, within)]


@pytest.mark.parametrize(
    "a, b, golden",
    [
        (Stat(0.0, 1.0, 3), Stat(0.0, 1.0, 3), 3.508),  # 3 seeds each: 3.5 std
        (Stat(0.0, 0.5, 3), Stat(0.0, 0.5, 3), 1.754),  # scales with the spread
        (Stat(0.0, 1.0, 5), Stat(0.0, 1.0, 5), 2.083),  # more seeds, smaller
        (Stat(44.6, 1.56, 3), Stat(47.71, 0.78, 3), 4.701),  # KanjiVG dense vs RigL 50%
    ],
)
def test_detectable_difference_golden_values(a, b, golden):
    assert detectable_difference(a, b) == pytest.approx(golden, abs=0.002)


def test_the_detectable_difference_is_found_with_80_percent_power():
    # an independent simulation of the Welch test at that difference, other draws
    a, b = Stat(0.0, 1.0, 3), Stat(0.0, 2.0, 3)
    d = detectable_difference(a, b)
    rng = np.random.default_rng(123)
    x, y = rng.normal(0, 1, (40_000, 3)), rng.normal(d, 2, (40_000, 3))
    power = (ttest_ind(x, y, axis=1, equal_var=False).pvalue < 0.05).mean()
    assert power == pytest.approx(0.80, abs=0.01)
    # half the difference is found far less often: the number means what it says
    y = rng.normal(d / 2, 2, (40_000, 3))
    assert (ttest_ind(x, y, axis=1, equal_var=False).pvalue < 0.05).mean() < 0.4


def test_no_detectable_difference_without_two_seeds():
    assert detectable_difference(Stat(1.0, None, 1), Stat(1.0, 0.5, 3)) is None
    assert detectable_difference(Stat(1.0, 0.0, 3), Stat(2.0, 0.0, 3)) == 0.0


@pytest.mark.parametrize(
    "a, b",
    [([10.0, 10.5, 11.0], [5.0, 5.5, 6.0]), ([5.0, 5.5, 6.0], [10.0, 10.5, 11.0])],
)
def test_one_sided_welch_is_scipys_greater(a, b):
    from sparsediff.study.stats import welch_p_above

    expected = ttest_ind(a, b, equal_var=False, alternative="greater").pvalue
    assert welch_p_above(Stat.of(a), Stat.of(b)) == pytest.approx(expected, rel=1e-9)
    assert welch_p_above(Stat.of(a), Stat.of([5.0])) is None  # one seed: no test
