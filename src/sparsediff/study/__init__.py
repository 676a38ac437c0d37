"""Studies: grids of sparse-training runs (``run_study``) and their reports (``write_report``).

See ``sparsediff.study.grid`` for the study TOML format, ``sparsediff.study.sweep`` for the
results.jsonl schema, ``sparsediff.study.stats`` for the verdicts' rules and
``sparsediff.study.report`` for the report.
"""

from sparsediff.study.grid import Cell, Study, expand_grid, load_study
from sparsediff.study.report import write_report
from sparsediff.study.results import read_results
from sparsediff.study.stats import safe_values
from sparsediff.study.sweep import StudyError, run_study

__all__ = [
    "Cell",
    "Study",
    "StudyError",
    "expand_grid",
    "load_study",
    "read_results",
    "run_study",
    "safe_values",
    "write_report",
]
