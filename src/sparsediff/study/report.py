"""The study report: FID tables, cost, plots, side-by-side samples and "safe values".

``write_report(study_dir)`` reads ``results.jsonl`` (and ``study.json`` for the command and the
dataset order) and writes ``report/report.md`` with its PNGs next to it in ``report/``. Results
come first: per dataset (with a bold warning when FID rests on too few images; the noise floors
and baselines; FID against the first stage's reconstructions where there is one), then a verdict
per claim of the study, the "safe values", and the evaluation protocol.

Conventions: in the FID table the Dense row repeats the dense reference in every column, and bold
marks the lowest mean FID among the sparse settings of each column. Settings, statistics over
seeds and the "safe" rule are in ``sparsediff.study.stats``; the figures in
``sparsediff.study.plots``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from sparsediff.config import flatten
from sparsediff.io import read_json, write_text
from sparsediff.runtime import command_line
from sparsediff.study.frontier import (
    Target,
    frontier,
    read_speed,
    setting_name,
    summary_entries,
    targets,
)
from sparsediff.study.plots import (
    compose_samples,
    plot_fid_vs_flops,
    plot_fid_vs_sparsity,
    plot_frontier,
)
from sparsediff.study.results import RESULTS_FILE, STUDY_FILE, read_results
from sparsediff.study.stats import (
    ALPHA,
    MIN_FID_SAMPLES,
    MISSING,
    REL_TOL,
    Comparison,
    Setting,
    Stat,
    baselines,
    compare_prune_ratios,
    group_settings,
    holm,
    judge,
    pct,
    row_label,
    row_order,
    safe_values,
    sample_sizes,
    span,
    split_dense,
    verdict_word,
)

# cost ratios shown against dense: (label, key, dense key)
COST_RATIOS = (
    ("Params (×dense)", "params_nonzero", "params_dense_total"),
    ("Train FLOPs (×dense)", "train_flops", "train_flops_dense"),
    ("Inference FLOPs (×dense)", "inference_flops", "inference_flops_dense"),
    ("Sample FLOPs (×dense)", "sample_flops", "sample_flops_dense"),
)


def _markdown(header: list[str], rows: list[list[str]], align: str = "r") -> str:
    lines = ["| " + " | ".join(header) + " |"]
    sep = "---:" if align == "r" else "---"
    lines.append("| " + " | ".join(["---"] + [sep] * (len(header) - 1)) + " |")
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _columns(sparse: list[Setting]) -> list[float]:
    return sorted({s.sparsity for s in sparse}) or [0.0]


def metric_table(
    settings: list[Setting],
    metric: str = "fid",
    title: str = "FID ↓",
    digits: int = 2,
    scale: float = 1.0,
    higher_better: bool = False,
    source: str = "metrics",
) -> str:
    """Markdown table of one dataset: rows (method, p), columns sparsity levels.

    The Dense row repeats the dense value in every column; bold marks the best mean among the
    sparse settings of each column.
    """
    dense, sparse = split_dense(settings)
    columns = _columns(sparse)
    n_full = max((s.metric(metric, source).n for s in settings), default=0)
    cells: dict[tuple, dict[float, Stat]] = {}
    for s in sparse:
        cells.setdefault(s.row, {})[s.sparsity] = s.metric(metric, source)
    pick = max if higher_better else min
    best = {}
    for col in columns:
        means = [c[col].mean for c in cells.values() if col in c and c[col].mean is not None]
        best[col] = pick(means) if means else None
    rows = []
    for s in ([dense] if dense is not None else []) + baselines(settings):
        text = s.metric(metric, source).format(digits, scale, n_full)
        rows.append([row_label(*s.row)] + [text] * len(columns))
    for row in sorted(cells, key=row_order):
        line = [row_label(*row)]
        for col in columns:
            stat = cells[row].get(col, Stat(None, None, 0))
            text = stat.format(digits, scale, n_full)
            line.append(f"**{text}**" if stat.mean is not None and stat.mean == best[col] else text)
        rows.append(line)
    return _markdown([f"{title} / sparsity"] + [pct(c) for c in columns], rows)


def fid_table(settings: list[Setting]) -> str:
    """The table the study is about: FID per (method, p) and sparsity."""
    return metric_table(settings, "fid", "FID ↓")


def cost_table(settings: list[Setting]) -> str:
    """Params / train / inference / sample FLOPs relative to dense, and the measured sampling
    time relative to dense's, per (method, p) and sparsity (baselines repeated per column)."""
    dense, sparse = split_dense(settings)
    columns = _columns(sparse)
    dense_seconds = dense.cost("sampling_seconds_per_sample").mean if dense else None
    cells: dict[tuple, dict[float, str]] = {}
    rows = []
    for s in sparse + baselines(settings):
        if s.sparsity > 0:  # the run's own sparse count against its own dense count
            parts = [_ratio(s.cost_ratio(key, ref).mean) for _, key, ref in COST_RATIOS]
        else:  # a smaller dense model: its costs against the dense model's
            parts = [_ratio(_over(s.cost(key), dense, key)) for _, key, _ in COST_RATIOS]
        seconds = s.cost("sampling_seconds_per_sample").mean
        parts.append(_ratio(seconds / dense_seconds if seconds and dense_seconds else None))
        if s.sparsity == 0:
            rows.append([row_label(*s.row)] + [" / ".join(parts)] * len(columns))
        else:
            cells.setdefault(s.row, {})[s.sparsity] = " / ".join(parts)
    rows += [
        [row_label(*row)] + [cells[row].get(col, MISSING) for col in columns]
        for row in sorted(cells, key=row_order)
    ]
    title = "×dense: params / train / inference / sample FLOPs / sampling time"
    return _markdown([title] + [pct(c) for c in columns], rows)


def _over(value: Stat, dense: Setting | None, key: str) -> float | None:
    """A baseline's cost as a fraction of dense's (None when either is unknown)."""
    ref = dense.cost(key).mean if dense else None
    return value.mean / ref if value.mean is not None and ref else None


def dense_cost(settings: list[Setting]) -> str | None:
    """One line of the dense model's absolute costs (the reference of the ratios)."""
    dense, _ = split_dense(settings)
    if dense is None:
        return None
    parts = []
    for key, unit, what in (
        ("params_nonzero", "", "non-zero parameters"),
        ("train_flops", "FLOP", "to train"),
        ("inference_flops", "FLOP", "per network evaluation"),
        ("sample_flops", "FLOP", "per sample"),
    ):
        value = Stat.of((r.get("cost") or {}).get(key) for r in dense.records).mean
        if value is not None:
            parts.append(f"{_count(value, unit)} {what}")
    # wall time per generated sample; null when the samples came from an earlier run's shards
    seconds = Stat.of(
        (r.get("cost") or {}).get("sampling_seconds_per_sample") for r in dense.records
    ).mean
    if seconds is not None:
        parts.append(f"{_duration(seconds)} sampling time per sample")
    return "Dense: " + ", ".join(parts) + "." if parts else None


def _count(x: float, unit: str = "") -> str:
    """1.5e9 -> ``1.50 GFLOP`` (unit FLOP) or ``1.50 G``."""
    for prefix, size in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= size:
            return f"{x / size:.2f} {prefix}{unit}"
    return f"{x:.0f} {unit}".rstrip()


def _duration(seconds: float) -> str:
    """0.3 -> ``0.30 s``; below 0.1 s in milliseconds: 0.0305 -> ``30.5 ms``."""
    return f"{seconds:.2f} s" if seconds >= 0.1 else f"{seconds * 1e3:.1f} ms"


def _ratio(x: float | None) -> str:
    return MISSING if x is None else f"{x:.3f}"


OTHER_METRICS = (  # (metric, title, digits, scale, higher is better)
    ("kid_mean", "KID ×10³ ↓", 2, 1e3, False),
    ("precision", "Precision ↑", 3, 1.0, True),
    ("recall", "Recall ↑", 3, 1.0, True),
)


def other_tables(settings: list[Setting]) -> list[str]:
    """KID / precision / recall tables, for those metrics some record has."""
    return [
        metric_table(settings, metric, title, digits, scale, higher)
        for metric, title, digits, scale, higher in OTHER_METRICS
        if any(s.metric(metric).n for s in settings)
    ]


FLOOR_ROWS = (
    ("real_vs_real", "Real vs real"),
    ("autoencoder", "First-stage reconstructions vs real"),
)
FLOOR_METRICS = (("fid", "FID ↓", 2, 1.0, False), *OTHER_METRICS)


def floors_table(settings: list[Setting], floors: dict | None) -> str | None:
    """The noise floors (sets no model can beat, measured by the same protocol) above dense and
    the baselines: what a difference between models has to be measured against."""
    dense, _ = split_dense(settings)
    rows = []
    for key, label in FLOOR_ROWS:
        values = ((floors or {}).get("floors") or {}).get(key)
        if values:
            texts = [_value(values.get(m), d, sc) for m, _, d, sc, _ in FLOOR_METRICS]
            rows.append([f"{label} (floor)", *texts, MISSING])
    for s in ([dense] if dense is not None else []) + baselines(settings):
        n = len(s.records)
        texts = [s.metric(m).format(d, sc) for m, _, d, sc, _ in FLOOR_METRICS]
        params = s.cost("params_nonzero").mean
        label = f"{row_label(*s.row)} ({n} seed{'s' if n != 1 else ''})"
        rows.append([label, *texts, _count(params) if params is not None else MISSING])
    if not rows or (floors is None and not baselines(settings)):
        return None
    header = (
        ["Noise floors and baselines"] + [t for _, t, *_ in FLOOR_METRICS] + ["Non-zero params"]
    )
    table = _markdown(header, rows)
    for warning in (floors or {}).get("warnings") or []:
        table += f"\n\n**Warning: {warning}.**"
    if (floors or {}).get("floors"):
        proto = floors.get("protocol") or {}
        ref, other = proto.get("reference") or {}, proto.get("second_set") or {}
        table += (
            f"\n\nFloors: the reference set ({ref.get('split')}, {ref.get('size')} items) against "
            f"a disjoint real set ({other.get('split')}, {other.get('size')} items from item "
            f"{other.get('offset', 0)}), and against the first stage's reconstructions of that "
            "set where the pipeline has one; same feature network and KID subset size."
        )
    return table


def _value(x: float | None, digits: int, scale: float) -> str:
    return MISSING if x is None else f"{x * scale:.{digits}f}"


def small_sample_warning(settings: list[Setting]) -> str | None:
    """A bold line when FID rests on too few images for small differences to mean anything."""
    sizes = sample_sizes(settings)
    if not sizes.small:
        return None
    return (
        f"**Warning: FID from {sizes.describe()}. Below {MIN_FID_SAMPLES} images FID is biased "
        "upwards and noisy (docs/evaluation.md): at these sizes, differences of a few FID points "
        "are within sampling noise.**"
    )


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _protocol_table(records: list[dict], datasets: list[str]) -> str:
    """Rows: protocol keys; columns: datasets; differing values are joined with ' / '."""
    values: dict[str, dict[str, list[str]]] = {}
    for r in records:
        for key, v in flatten(r.get("protocol") or {}).items():
            text = v if isinstance(v, str) else json.dumps(v)
            seen = values.setdefault(key, {}).setdefault(r["dataset"], [])
            if text not in seen:
                seen.append(text)
    if not values:
        return "_No protocol recorded by the evaluation._"
    rows = [
        [key] + [" / ".join(values[key].get(ds, [MISSING])) for ds in datasets] for key in values
    ]
    return _markdown(["Protocol"] + datasets, sorted(rows), align="l")


def _dataset_order(records: list[dict], study: dict) -> list[str]:
    listed = [d["name"] for d in study.get("study", {}).get("datasets", [])]
    seen = [r["dataset"] for r in records]
    return [d for d in listed if d in seen] + list(
        dict.fromkeys(d for d in seen if d not in listed)
    )


def _safe_section(records: list[dict], datasets: list[str], rel_tol: float) -> list[str]:
    verdicts = safe_values(records, rel_tol)
    lines = [
        "## Safe values",
        "",
        "A sparse setting is *safe* when its FID is not worse than dense beyond the noise: "
        "with ≥ 2 seeds on both sides, not higher by a two-sided Welch t-test at 5%; with a "
        "single seed on either side (no test), mean FID ≤ dense mean FID + tolerance, the "
        "larger known seed standard deviation or, when neither is known, "
        f"{rel_tol:.0%} of the dense mean FID. Such a verdict is marked weak.",
        "",
    ]
    safe_sets = []
    for ds in datasets:
        if ds not in verdicts:
            lines.append(f"- **{ds}**: no dense run, so no verdict.")
            continue
        safe = [v for v in verdicts[ds] if v.safe]
        safe_sets.append({v.setting.label for v in safe})
        lines.append(f"- **{ds}**: {len(safe)} of {len(verdicts[ds])} sparse settings are safe.")
        lines += [f"  - {v.describe()}" for v in safe]
        unsafe = [v.setting.label for v in verdicts[ds] if not v.safe]
        if unsafe:
            lines.append(f"  - Not safe: {', '.join(unsafe)}.")
    if len(safe_sets) > 1:
        common = sorted(set.intersection(*safe_sets))
        lines += ["", f"Safe on every dataset: {', '.join(common) if common else 'none'}."]
    comparisons = compare_prune_ratios(records)
    lines += ["", "### Prune/regrowth ratio at the highest sparsity", ""]
    if not comparisons:
        lines.append("No sparsity level has runs with two values of p.")
    for c in comparisons:
        lines.append(f"- **{c.dataset}**, {c.describe()}")
    if comparisons:
        wins = sum(c.low_better for c in comparisons)
        firm = sum(c.low_better and c.conclusive for c in comparisons)
        lines += [
            "",
            f"The smaller p was better in {wins} of {len(comparisons)} comparisons "
            f"({firm} beyond the noise: Welch t-test p < 0.05).",
        ]
    return lines


RECON = "metrics_vs_reconstructions"


def matching_floors(settings: list[Setting], floors: dict | None) -> tuple[dict | None, str]:
    """The floors line if it was measured by the models' protocol (same reference set, feature
    network and, where both recorded it, first stage), else None and why."""
    if floors is None:
        return None, ""
    theirs = floors.get("protocol") or {}
    for s in settings:
        for r in s.records:
            ours = r.get("protocol") or {}
            for key in ("reference", "feature_network", "first_stage"):
                if key in ours and key in theirs and ours[key] != theirs[key]:
                    return None, (
                        f"The noise floors line `{floors['id']}` was measured with another "
                        f"{key.replace('_', ' ')} than {r['id']}: not shown. Delete that line "
                        "from results.jsonl and rerun the study to measure them again."
                    )
    return floors, ""


def _reference_lines(settings: list[Setting], floors: dict | None) -> dict[str, float]:
    """Horizontal FID lines for the plots: the noise floors and the baselines."""
    out = {}
    for key, label in FLOOR_ROWS:
        fid = (((floors or {}).get("floors") or {}).get(key) or {}).get("fid")
        if fid is not None:
            out[label] = fid
    for b in baselines(settings):
        if (fid := b.metric("fid").mean) is not None:
            out[row_label(*b.row)] = fid
    return out


UNSTRUCTURED = ("static", "rigl", "magran")  # the study's methods; variants are extra rows


def _verdict(for_: int, against: int, within: int) -> str:
    """The claim's word (``stats.verdict_word``), in bold."""
    return f"**{verdict_word(for_, against, within)}**"


def _holm(tests: list[tuple[float, int]]) -> tuple[int, int]:
    """How many of a claim's tests ``(p, direction)`` (+1 the claim's way, -1 against it) stay
    beyond the noise with Holm's correction over all of them: (the claim's way, against it)."""
    adjusted = holm([p for p, _ in tests])
    kept = [way for (_, way), q in zip(tests, adjusted) if q < ALPHA]
    return kept.count(1), kept.count(-1)


def _holm_sentence(tests: list[tuple[float, int]], untested: int) -> str:
    """For a claim that needs differences: its verdict when Holm's correction holds the chance
    of any false difference among its tests at 5% ('' below two tests)."""
    if len(tests) < 2:
        return ""
    for_, against = _holm(tests)
    within = len(tests) + untested - for_ - against
    word = _verdict(for_, against, within)
    return (
        f" With Holm's correction over its {len(tests)} tests: {word} ({for_} for, "
        f"{against} against beyond the noise)."
    )


def _claim_dense(settings: list[Setting], rel_tol: float, source: str) -> list[str]:
    """Claim 1: sparse training at 25-50% sparsity matches or beats dense.

    It is met by *no* difference (or a better one), so every tested setting that is not worse
    counts for it; a correction for many tests only removes differences, so it can make this
    claim easier to meet and never firmer: the report states it, but never as a verdict."""
    dense, sparse = split_dense(settings)
    picked = [s for s in sparse if 0.25 <= s.sparsity <= 0.5 and s.method in UNSTRUCTURED]
    if dense is None or dense.metric("fid", source).mean is None or not picked:
        return ["- 25–50% sparsity matches or beats dense: not run here."]
    ref = dense.metric("fid", source)
    verdicts = [v for v in (judge(s, ref, rel_tol, source) for s in picked) if v]
    worse = [v for v in verdicts if not v.safe and not v.weak]
    weak = [v for v in verdicts if v.weak]
    good = len(verdicts) - len(worse) - len(weak)
    tests = [
        (v.comparison.p_value, -1 if v.fid.mean > ref.mean else 1) for v in verdicts if not v.weak
    ]
    holm_note = ""
    if len(tests) >= 2:
        _, worse_holm = _holm(tests)
        holm_note = (
            f" With Holm's correction over its {len(tests)} tests {worse_holm} would stay worse; "
            "a correction can only turn a difference into a match, so it makes this claim "
            "easier to meet, never firmer: the verdict is the one at 5% per test."
        )
    lines = [
        f"- 25–50% sparsity matches or beats dense: {_verdict(good, len(worse), len(weak))} — "
        f"{good} of {len(verdicts)} settings match or beat dense, {len(worse)} "
        f"{'is' if len(worse) == 1 else 'are'} worse beyond the noise"
        + (f", {len(weak)} with a single seed (no test)" if weak else "")
        + "."
        + holm_note
    ]
    return lines + [f"  - {v.describe()}" for v in verdicts]


def _claim_prune_ratio(settings: list[Setting], source: str) -> list[str]:
    """Claim 2: at high sparsity a small p is safer than a large one."""
    comparisons = compare_prune_ratios([r for s in settings for r in s.records], source)
    comparisons = [c for c in comparisons if c.sparsity >= 0.75]
    if not comparisons:
        return ["- p = 0.05 is safer than p = 0.5 at high sparsity: not run here."]
    for_ = sum(c.conclusive and c.low_better for c in comparisons)
    against = sum(c.conclusive and not c.low_better for c in comparisons)
    within = len(comparisons) - for_ - against
    tests = [(c.p_value, 1 if c.low_better else -1) for c in comparisons if c.p_value is not None]
    lines = [
        f"- p = 0.05 is safer than p = 0.5 at high sparsity: {_verdict(for_, against, within)} "
        f"— {for_} for, {against} against beyond the noise, {within} within it."
        + _holm_sentence(tests, len(comparisons) - len(tests))
    ]
    return lines + [f"  - {c.describe()}" for c in comparisons]


def _claim_small_dense(settings: list[Setting], rel_tol: float, source: str) -> list[str]:
    """Claim 3 (the reader's question): a sparse model beats a dense one of its size."""
    _, sparse = split_dense(settings)
    small = [b for b in baselines(settings) if b.metric("fid", source).mean is not None]
    picked = [
        s
        for s in sparse
        if s.sparsity == 0.5
        and s.method in UNSTRUCTURED
        and s.metric("fid", source).mean is not None
    ]
    if not small or not picked:
        return ["- 50% sparse beats a small dense model of its parameter count: not run here."]
    named = [b for b in small if b.method == "small-dense"]
    base = (named or small)[0]
    params = base.cost("params_nonzero").mean
    lines = []
    counts = {"beats": 0, "worse than": 0, "matches": 0}
    tests = []
    for s in picked:
        c = Comparison.of(s.metric("fid", source), base.metric("fid", source), rel_tol)
        counts["matches" if c.weak else c.word] += 1  # no test, no verdict either way
        if not c.weak:
            tests.append((c.p_value, 1 if c.value.mean < c.reference.mean else -1))
        nonzero = s.cost("params_nonzero").mean
        lines.append(
            f"  - {s.label}: FID {c.value.format()} ({_count(nonzero) if nonzero else MISSING} "
            f"non-zero parameters) {c.word} {row_label(*base.row)} {c.reference.format()} "
            f"({_count(params) if params else MISSING}; {c.explained})"
        )
    head = _verdict(counts["beats"], counts["worse than"], counts["matches"])
    return [
        f"- 50% sparse beats a small dense model of its parameter count: {head} — "
        f"{counts['beats']} beat it, {counts['worse than']} worse than it, "
        f"{counts['matches']} within the noise." + _holm_sentence(tests, len(picked) - len(tests))
    ] + lines


VERDICT_RULE = (
    "Each claim is checked per dataset with a two-sided Welch t-test at 5% on the per-seed "
    "FIDs of each of its comparisons (`sparsediff.study.stats`). A comparison is *for* the "
    "claim, *against* it (both beyond the noise) or *within the noise* (untested single seeds "
    "count there too), and the claim's word follows from the three counts by one rule, the "
    "same in both directions (`stats.verdict_word`): *agree*: all for; *partly*: some for, "
    "none against; *mixed*: some each way; *cannot tell*: none either way; *leans against*: "
    'some against, none for; *disagree*: all against. For "matches or beats dense" a match '
    "counts for the claim: it wins by no difference. Beside every match stands the smallest "
    "difference the test could have detected with these seeds and spreads (80% power at 5%, "
    '`stats.detectable_difference`): a match is "no difference this study could see", not '
    "proof of equality. The verdicts are at 5% per test, in every dataset. A claim that needs "
    "differences (p, small dense) with several tests also gets its verdict with Holm's "
    "correction, which holds the chance of any false difference among them at 5%; a claim won "
    "by no difference gets no corrected verdict, since a correction could only make it easier "
    "to meet."
)


def claims_section(
    by_dataset: dict[str, list[Setting]], datasets: list[str], rel_tol: float
) -> list[str]:
    """A verdict per claim of the study, per dataset (the rule: ``VERDICT_RULE``)."""
    lines = ["## The study's claims", "", VERDICT_RULE, ""]
    for ds in datasets:
        settings = by_dataset[ds]
        for source, what in (
            ("metrics", ""),
            (RECON, " — against the first stage's reconstructions"),
        ):
            if not any(s.metric("fid", source).n for s in settings):
                continue
            lines += [f"### {ds}{what}", ""]
            lines += _claim_dense(settings, rel_tol, source)
            lines += _claim_prune_ratio(settings, source)
            lines += _claim_small_dense(settings, rel_tol, source)
            lines.append("")
    return lines


LEGEND = (
    "Values are mean ± sample std over seeds (± only with ≥ 2 seeds; `(n=k)` marks a setting "
    "with fewer seeds than the others). **Bold**: the best mean among the sparse settings at "
    "that sparsity (lowest FID/KID, highest precision/recall); the Dense row and the "
    "baselines (e.g. a small dense model) repeat their value in every column. Costs are means "
    "over seeds, relative to the dense model as each run's evaluation counted it: non-zero "
    "parameters, inference FLOPs per network evaluation, sample FLOPs per generated sample "
    "(sampler steps and decoding included), and the sampling wall time each evaluation "
    "measured (the masked network as trained, on whatever else the machine was running: a "
    "rough figure; `benchmarks/` measures speed-ups under control)."
)


def write_report(study_dir: Path, rel_tol: float = REL_TOL) -> Path:
    """Write ``study_dir/report/report.md`` and its PNGs; return the report's path.

    First what was run and the samples (the first screen), then per dataset the tables and
    plots, the claims, the safe values and the protocol."""
    study_dir = Path(study_dir)
    # the last line of a cell wins; lines without a cell's identity cannot be placed in a table
    by_id = {r["id"]: r for r in read_results(study_dir / RESULTS_FILE)}
    records = [r for r in by_id.values() if r.get("dataset") and r.get("method")]
    floors = {r["dataset"]: r for r in by_id.values() if r.get("kind") == "floors"}
    if not records:
        raise ValueError(f"no results in {study_dir / RESULTS_FILE}")
    study_path = study_dir / STUDY_FILE
    study = read_json(study_path) if study_path.exists() else {}
    out = study_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    by_dataset = group_settings(records)
    datasets = _dataset_order(records, study)
    lines = _header(study, study_dir, records, datasets)
    lines += _what_ran(by_dataset, datasets)
    for ds in datasets:
        samples = f"samples_{_slug(ds)}.png"
        if compose_samples(by_dataset[ds], study_dir, out / samples, ds) is not None:
            lines += [f"![Samples of {ds}]({samples})", ""]
    if (speed := read_speed(study_dir)) is not None:
        lines += _frontier_section(records, speed, datasets, out)
        commands = [
            f"sparsediff study {study.get('name', study_dir.name)} --out {study_dir}",
            speed.get("command", "python benchmarks/study_speedup.py"),
            command_line(),
        ]
        summary = summary_entries(records, speed, "; ".join(commands))
        write_text(study_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    lines += [LEGEND, ""]
    for ds in datasets:
        lines += _dataset_section(by_dataset[ds], ds, floors.get(ds), out)
    lines += claims_section(by_dataset, datasets, rel_tol)
    lines += _safe_section(records, datasets, rel_tol)
    # last: the full protocol is for checking comparability, not the first thing to read
    lines += ["", "## Protocol", "", "<details><summary>Evaluation protocol per dataset</summary>"]
    lines += ["", _protocol_table(records, datasets), "", "</details>"]
    return write_text(out / "report.md", "\n".join(lines) + "\n")


def _header(study: dict, study_dir: Path, records: list[dict], datasets: list[str]) -> list[str]:
    n_cells = len(study.get("cells", [])) or len(records)
    lines = [
        f"# Study report: {study.get('name', study_dir.name)}",
        "",
        f"- Study: `{study.get('command', MISSING)}`",
        f"- Report: `{command_line()}`",
        f"- Finished cells: {len(records)} of {n_cells}; datasets: {', '.join(datasets)}.",
    ]
    if desc := study.get("study", {}).get("description"):
        lines += ["", desc]
    return [*lines, ""]


def _what_ran(by_dataset: dict[str, list[Setting]], datasets: list[str]) -> list[str]:
    """One row per dataset: its preset, settings, seeds, training steps and FID sizes."""
    rows = []
    for ds in datasets:
        settings = by_dataset[ds]
        records = [r for s in settings for r in s.records]
        steps = sorted({_steps(r) for r in records if _steps(r) is not None})
        sizes = sample_sizes(settings)
        rows.append(
            [
                ds,
                f"`{records[0].get('preset')}`",
                "; ".join(s.label for s in settings),
                span(sizes.seeds),
                ", ".join(map(str, steps)) or "the preset's",
                f"{span(sizes.generated)} vs {span(sizes.reference)}",
            ]
        )
    header = ["dataset", "preset", "settings", "seeds", "training steps", "FID: samples vs refs"]
    return ["## What ran", "", _markdown(header, rows), ""]


def _frontier_section(
    records: list[dict], speed: dict, datasets: list[str], out: Path
) -> list[str]:
    """Quality against the measured sampling time of every setting (``speed.json`` from
    ``benchmarks/study_speedup.py``), a plot and a table per dataset."""
    points = frontier(records, speed)
    judged = targets(points)
    lines = [
        "## Frontier: quality against sampling time",
        "",
        f"Sampling time per sample of each run as deployed (condensed where its structure "
        f"allows; the masked network otherwise), timed beside the dense run of its seed on "
        f"{speed.get('machine', MISSING)} ({speed.get('date', MISSING)}; "
        "`benchmarks/study_speedup.py`). FID is the denoiser's (against the first stage's "
        "reconstructions) where there is a first stage.",
        "",
    ]
    for ds in datasets:
        if not points.get(ds):
            continue
        name = f"frontier_{_slug(ds)}.png"
        if plot_frontier(points[ds], out / name, ds) is not None:
            lines += [f"![Frontier of {ds}]({name})", ""]
        header = ["setting", "FID ↓", "FID on images ↓", "ms / sample", "x dense", "parameters"]
        rows = [
            [
                setting_name(p.setting),
                p.fid.format(),
                p.fid_images.format() if p.denoiser_only else MISSING,
                p.seconds.format(1, 1e3),
                p.speedup.format(2),
                _count(p.params_deployed),
            ]
            for p in points[ds]
        ]
        lines += [_markdown(header, rows), ""]
        if goals := judged.get(ds):
            lines += _targets_table(goals)
    return lines


def _p(p: float | None) -> str:
    return "untested" if p is None else f"p = {p:.3f}"


def _targets_table(goals: list[Target]) -> list[str]:
    """The fast-and-good targets, setting by setting (``study.frontier.Target``)."""
    header = [
        "setting",
        "x dense",
        "FID vs dense",
        "worse than dense (one-sided Welch)",
        "vs small dense, equal time (Welch)",
        "target",
    ]
    rows = [
        [
            setting_name(g.point.setting),
            f"{g.point.speedup.mean:.2f} (≥ {g.needed:g})",
            f"{g.change:+.1%} (≤ +5%)",
            _p(g.p_worse),
            MISSING if g.small is None else f"{g.small.format()}, {_p(g.p_small)}",
            "**met**" if not g.missed else "not met: " + ", ".join(g.missed),
        ]
        for g in goals
    ]
    return [
        "Targets: at least the speed-up in the column, an FID (the denoiser's where there is a "
        "first stage) not worse than dense's (a one-sided Welch test at 5% finds no worsening, "
        "*and* the mean within +5%), and an FID below the small dense model's of equal sampling "
        "time beyond the noise (two-sided Welch, 5%). With one seed on either side there is no "
        "test, and the target is not met.",
        "",
        _markdown(header, rows),
        "",
    ]


def _steps(record: dict) -> int | None:
    """The steps a cell trained (older results: its ``train.steps`` override, if any)."""
    return record.get("steps") or (record.get("overrides") or {}).get("train.steps")


def _dataset_section(settings: list[Setting], ds: str, floors: dict | None, out: Path) -> list[str]:
    """A dataset's tables (FID, floors and baselines, against reconstructions, costs, other
    metrics) and plots."""
    first = settings[0].records[0]
    lines = [f"## {ds}", ""]
    if (warning := small_sample_warning(settings)) is not None:
        lines += [warning, ""]
    lines += [f"Preset `{first.get('preset')}` ({first.get('pipeline')}).", ""]
    lines += [fid_table(settings), ""]
    ds_floors, why = matching_floors(settings, floors)
    if why:
        lines += [f"**{why}**", ""]
    if (table := floors_table(settings, ds_floors)) is not None:
        lines += [table, ""]
    if any(s.metric("fid", RECON).n for s in settings):
        lines += [
            "Against the first stage's reconstructions of the reference images instead of "
            "the images: this isolates the denoiser (the part that is sparse) from the "
            "autoencoder's own error.",
            "",
            metric_table(settings, "fid", "FID vs reconstructions ↓", source=RECON),
            "",
            metric_table(
                settings, "kid_mean", "KID ×10³ vs reconstructions ↓", 2, 1e3, source=RECON
            ),
            "",
        ]
    if (line := dense_cost(settings)) is not None:
        lines += [line, ""]
    lines += [cost_table(settings), ""]
    for table in other_tables(settings):
        lines += [table, ""]
    slug = _slug(ds)
    figures = [
        (plot_fid_vs_sparsity, f"fid_vs_sparsity_{slug}.png", "FID vs sparsity"),
        (plot_fid_vs_flops, f"fid_vs_train_flops_{slug}.png", "FID vs training FLOPs"),
    ]
    lines_at = _reference_lines(settings, ds_floors)
    for plot, filename, caption in figures:
        if plot(settings, out / filename, ds, lines=lines_at) is not None:
            lines += [f"![{caption}]({filename})", ""]
    return lines
