"""Config sections: dataclasses whose values are checked by the rules written beside their fields.

Each package owns the sections of what it knows (the engine its ``SparseSettings``, the diffusion
package the schedule and the sampler, each pipeline its data and model) and their choice lists;
:mod:`sparsediff.config` assembles them into a run's config without knowing any of them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

Rule = tuple[Callable[[Any], bool], str] | tuple[str, ...]  # (predicate, text) or choices


def at_least(low: float) -> tuple[Callable[[Any], bool], str]:
    """A rule: the value is >= ``low``."""
    return (lambda v: v >= low), f"must be >= {low}"


POSITIVE: Rule = ((lambda v: v > 0), "must be > 0")
FRACTION: Rule = ((lambda v: 0 <= v < 1), "must lie in [0, 1)")


class Section:
    """A config section: ``_RULES`` maps a key to its choices or ``(predicate, text)``;
    ``_PATHS`` names the keys that hold paths (relative ones are relative to the run directory;
    what a user types is made absolute)."""

    _RULES: ClassVar[dict[str, Rule]] = {}
    _PATHS: ClassVar[tuple[str, ...]] = ()

    def check(self, section: str) -> None:
        """Raise a ValueError naming ``section.key``, the value and the rule it breaks."""
        for key, rule in self._RULES.items():
            value = getattr(self, key)
            if isinstance(rule[0], str):  # a tuple of choices
                test, text = (lambda v, rule=rule: v in rule), f"allowed: {', '.join(rule)}"
            else:
                test, text = rule
            if not test(value):
                raise ValueError(f"{section}.{key} = {value!r}; {text}")

    def resolved(self) -> Section:
        """This section with "the default" placeholders replaced by numbers (for config.json)."""
        return self
