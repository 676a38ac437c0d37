"""Studies: grids of sparse-training runs (``run_study``) and their reports (``write_report``).

See ``sparsediff.study.grid`` for the study TOML format, ``sparsediff.study.sweep`` for the
results.jsonl schema and ``sparsediff.study.report`` for the report's rules.
"""

from sparsediff.study.grid import Cell, Study, expand_grid, load_study
from sparsediff.study.report import safe_values, write_report
from sparsediff.study.sweep import StudyError, read_results, run_study

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
