"""The prose that summarises the evidence study quotes its report: every mean ± std, p-value and
detectable difference in it stands in docs/results/evidence/report/report.md, as printed there."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "docs" / "results" / "evidence" / "report" / "report.md"
QUOTED = (r"\d+\.\d\d ± \d+\.\d\d", r"\bp = 0\.\d+", r"could detect ≥ \d+\.\d+")


def _evidence_prose():
    results = (ROOT / "docs" / "results" / "README.md").read_text(encoding="utf-8")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start = readme.index("**The evidence study**")
    return {
        "docs/results/README.md": results[: results.index("## `quick/`")],
        "README.md": readme[start : readme.index("## Using it", start)],
    }


@pytest.mark.parametrize("name", ["docs/results/README.md", "README.md"])
def test_every_number_of_the_evidence_prose_is_the_reports(name):
    report = REPORT.read_text(encoding="utf-8")
    prose = _evidence_prose()[name]
    quoted = [m for pattern in QUOTED for m in re.findall(pattern, prose)]
    # whole numbers only: "p = 0.11" is not "p = 0.119"
    missing = sorted({q for q in quoted if not re.search(re.escape(q) + r"(?!\d)", report)})
    assert not missing, f"{name} quotes numbers its report does not print: {missing}"


def test_the_quotes_are_found():  # the patterns see what the prose writes
    quoted = re.findall(QUOTED[0], "FID 67.35 ± 0.25 (p = 0.105, could detect ≥ 1.49)")
    assert quoted == ["67.35 ± 0.25"]
    assert re.findall(QUOTED[1], "p = 0.105; p = 0.5 is better") == ["p = 0.105", "p = 0.5"]


# every other study's section of docs/results/README.md quotes its own report
SECTIONS = {"dit": "## `dit/`", "fast": "## `fast/`"}


@pytest.mark.parametrize("study", sorted(SECTIONS))
def test_each_study_section_quotes_its_own_report(study):
    results = (ROOT / "docs" / "results" / "README.md").read_text(encoding="utf-8")
    start = results.index(SECTIONS[study])
    end = results.find("\n## ", start + 1)
    prose = results[start : None if end < 0 else end]
    report = (ROOT / "docs" / "results" / study / "report" / "report.md").read_text("utf-8")
    quoted = [m for pattern in QUOTED for m in re.findall(pattern, prose)]
    assert len(quoted) >= 5  # the section does quote its report
    missing = sorted({q for q in quoted if not re.search(re.escape(q) + r"(?!\d)", report)})
    assert not missing, f"the {study}/ section quotes numbers its report does not print: {missing}"
