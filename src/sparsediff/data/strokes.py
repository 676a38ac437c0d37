"""Readers/writers for pen-stroke file formats: stroke-3 ``.npz``, QuickDraw ``.ndjson``, SVG.

All readers return raw sketches (list of ``(n, 2)`` float arrays, see ``sketch_ops``) or
raw stroke-3 arrays, plus a :class:`LoadReport` counting what was skipped and why.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import math
import pickle
import re
import xml.etree.ElementTree as ET
import zipfile
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sparsediff.data.sketch_ops import Sketch, stroke3_to_strokes, validate_sketch
from sparsediff.io import atomic_write


@dataclass
class LoadReport:
    """Counts of a loading pass: entries seen, kept, and skipped per reason."""

    total: int = 0
    kept: int = 0
    skipped: Counter[str] = field(default_factory=Counter)

    def skip(self, reason: str) -> None:
        """Record one skipped entry."""
        self.skipped[reason] += 1

    def read(
        self,
        sketches: list[Sketch],
        load: Callable[[], Sketch | str],
        errors: tuple[type[Exception], ...] = (),
        failure: str = "bad_shape",
    ) -> None:
        """Count one entry: ``load()`` gives a sketch (or the reason it has none), which is
        kept when valid; ``errors`` raised while loading count as ``failure``."""
        self.total += 1
        try:
            strokes = load()
            reason = strokes if isinstance(strokes, str) else validate_sketch(strokes)
        except errors:
            reason = failure
        if reason is None:
            sketches.append(strokes)
            self.kept += 1
        else:
            self.skip(reason)

    def __str__(self) -> str:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        return f"{self.kept}/{self.total} kept; skipped: {reasons}"


# --------------------------------------------------------------------------- safe npz


class UnsafePickleError(pickle.UnpicklingError):
    """Raised when a pickle inside an ``.npz`` references anything but numpy array classes."""


def _numpy_reconstruct() -> object:
    # Resolve numpy's private _reconstruct without importing the deprecated numpy.core.
    return np.empty(0, dtype=object).__reduce__()[0]


def _numpy_scalar() -> object:
    return np.float64(0).__reduce__()[0]


def _latin1_encode(obj: str, encoding: str = "latin1") -> bytes:
    # Python-3 protocol-2 pickles store bytes as _codecs.encode(text, "latin1").
    if encoding.lower().replace("-", "") not in ("latin1", "iso88591"):
        raise UnsafePickleError(f"refusing _codecs.encode with encoding {encoding!r}")
    return obj.encode("latin1")


_ALLOWED_GLOBALS: dict[tuple[str, str], object] = {
    ("_codecs", "encode"): _latin1_encode,
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct(),
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct(),
    ("numpy.core.multiarray", "scalar"): _numpy_scalar(),
    ("numpy._core.multiarray", "scalar"): _numpy_scalar(),
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that can only rebuild numpy arrays/dtypes/scalars; anything else is refused.

    Allowed globals: numpy's ``_reconstruct`` and ``scalar`` (``numpy.core`` and
    ``numpy._core`` spellings), ``numpy.ndarray``, ``numpy.dtype`` and a latin-1-only
    ``_codecs.encode`` (bytes in protocol-2 pickles).
    """

    def find_class(self, module: str, name: str) -> object:
        """Return an allowed numpy global or raise :class:`UnsafePickleError`."""
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to unpickle global {module}.{name}: only numpy array data is allowed"
            ) from None


def _read_npy_member(fp: object, name: str) -> np.ndarray:
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
    if not dtype.hasobject:
        count = int(np.prod(shape))
        data = np.frombuffer(fp.read(count * dtype.itemsize), dtype=dtype, count=count)
        return data.reshape(shape, order="F" if fortran else "C").copy()
    # latin1: QuickDraw files were pickled by Python 2 with raw byte strings.
    arr = RestrictedUnpickler(fp, encoding="latin1").load()
    if not isinstance(arr, np.ndarray) or arr.shape != tuple(shape):
        raise UnsafePickleError(f"member {name!r} did not unpickle to an array of shape {shape}")
    return arr


# Largest member (uncompressed) the .npz reader accepts: QuickDraw's largest sketch-rnn split is
# a few hundred MB; anything far beyond is not sketch data.
MAX_NPZ_MEMBER_BYTES = 2 << 30


def load_npz_safe(
    path: str | Path, names: Sequence[str] | None = None, max_bytes: int = MAX_NPZ_MEMBER_BYTES
) -> dict[str, np.ndarray]:
    """Read the arrays ``names`` (default: all) of an ``.npz`` without running pickled code.

    Only the asked members are decoded; a member larger than ``max_bytes`` uncompressed is
    refused. Object arrays are unpickled with :class:`RestrictedUnpickler` (numpy classes only).
    Any unreadable file raises a ValueError naming it.
    """
    out: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(path) as zf:
            members = {
                m.filename[: -len(".npy")]: m for m in zf.infolist() if m.filename.endswith(".npy")
            }
            missing = [n for n in names or () if n not in members]  # said after the archive
            for name in [] if missing else names or members:
                if members[name].file_size > max_bytes:
                    raise ValueError(
                        f"member {name!r} holds {members[name].file_size} bytes, more than the "
                        f"{max_bytes} this reader accepts (MAX_NPZ_MEMBER_BYTES)"
                    )
                with zf.open(members[name]) as fp:
                    out[name] = _read_npy_member(fp, name)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, pickle.UnpicklingError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        if isinstance(err, UnsafePickleError):
            raise UnsafePickleError(f"{path}: {err}") from None
        raise ValueError(f"{path}: not a readable .npz file ({err})") from None
    if missing:
        raise ValueError(f"{path} has no {missing[0]!r}; available: {sorted(members)}")
    return out


def _object_array(items: Sequence[np.ndarray]) -> np.ndarray:
    arr = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):  # element-wise: arr[:] = list would try to broadcast
        arr[i] = item
    return arr


def save_stroke3_npz(
    path: str | Path,
    splits: Mapping[str, Sequence[np.ndarray]],
    extra: Mapping[str, np.ndarray] | None = None,
) -> None:
    """Atomically write stroke-3 splits (object arrays of ``(n, 3)`` arrays) to a compressed
    ``.npz`` at exactly ``path``.

    ``extra`` holds plain (non-object) arrays such as labels.
    """
    arrays = {k: _object_array(list(v)) for k, v in splits.items()}
    arrays.update({k: np.asarray(v) for k, v in (extra or {}).items()})

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: numpy would append ".npz" to a tmp name
            np.savez_compressed(f, **arrays)

    atomic_write(path, write)


def _check_stroke3(seq: object) -> str | None:
    if not isinstance(seq, np.ndarray) or seq.dtype == object:
        return "bad_shape"
    if seq.ndim != 2 or seq.shape[1] != 3:
        return "bad_shape"
    if len(seq) == 0:
        return "empty"
    if not np.isfinite(seq.astype(np.float64)).all():
        return "nonfinite"
    return None


def load_stroke3_npz(
    path: str | Path, split: str, limit: int | None = None
) -> tuple[list[Sketch], LoadReport]:
    """Load one split (``train``/``valid``/``test``) of a sketch-rnn stroke-3 ``.npz``.

    Returns sketches (cumulative positions) and a report; at most ``limit`` entries are read.
    """
    entries = load_npz_safe(path, [split])[split]
    if limit is not None:
        entries = entries[:limit]
    report, sketches = LoadReport(), []
    for seq in entries:
        report.read(sketches, lambda seq=seq: _check_stroke3(seq) or stroke3_to_strokes(seq))
    return sketches, report


# --------------------------------------------------------------------------- ndjson


def _ndjson_drawing(drawing: object) -> Sketch:
    strokes = []
    for s in drawing:  # type: ignore[union-attr]
        if len(s) < 2 or len(s[0]) != len(s[1]):
            raise ValueError("stroke needs equal-length x and y lists")
        strokes.append(np.stack([np.asarray(s[0], float), np.asarray(s[1], float)], axis=1))
    return strokes


def load_ndjson(
    path: str | Path, category: str | None = None, limit: int | None = None
) -> tuple[list[Sketch], LoadReport]:
    """Load QuickDraw ``.ndjson`` drawings (raw or simplified), optionally filtered on ``word``.

    Lines of another category are ignored (not counted); malformed lines are skipped and
    counted. At most ``limit`` matching lines are read.
    """
    report, sketches = LoadReport(), []
    with open(path, "rb") as f:  # bytes: one bad line must not stop the whole file
        for line in f:
            if not line.strip():
                continue
            if limit is not None and report.total >= limit:
                break
            try:
                obj = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                report.total += 1
                report.skip("not_utf8")
                continue
            except json.JSONDecodeError:
                report.total += 1
                report.skip("json_error")
                continue
            if not isinstance(obj, dict):
                report.total += 1
                report.skip("bad_shape")
                continue
            if category is not None and obj.get("word") != category:
                continue
            errors = (KeyError, TypeError, ValueError)
            report.read(sketches, lambda obj=obj: _ndjson_drawing(obj["drawing"]), errors)
    return sketches, report


# --------------------------------------------------------------------------- SVG paths

_TOKEN = re.compile(r"[MmLlHhVvCcSsQqTtZzAa]|[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_N_ARGS = {"M": 2, "L": 2, "H": 1, "V": 1, "C": 6, "S": 4, "Q": 4, "T": 2, "Z": 0}


@functools.lru_cache(maxsize=1024)
def _bernstein(n: int, degree: int) -> np.ndarray:
    """Bernstein basis ``(n, degree + 1)`` at ``t = 1/n, ..., 1`` (start point excluded)."""
    t = np.linspace(0.0, 1.0, n + 1)[1:, None]
    k = np.arange(degree + 1)[None, :]
    binom = np.array([math.comb(degree, i) for i in range(degree + 1)], dtype=float)
    return binom * t**k * (1 - t) ** (degree - k)


def _bezier(ctrl: np.ndarray, curve_step: float) -> np.ndarray:
    """Sample a Bézier (control points ``(k, 2)``) excluding its start point."""
    poly_len = sum(math.dist(ctrl[j], ctrl[j + 1]) for j in range(len(ctrl) - 1))
    n = min(256, max(1, math.ceil(poly_len / curve_step)))
    return _bernstein(n, len(ctrl) - 1) @ ctrl


def parse_svg_path(d: str, curve_step: float = 1.0) -> list[np.ndarray]:
    """Parse an SVG path ``d`` string into polylines, one ``(n, 2)`` array per subpath.

    Supports M/L/H/V/C/S/Q/T/Z (absolute and relative, implicit repetition). Curves are
    sampled so consecutive points are at most about ``curve_step`` apart (in path units).
    Arcs (A) are not supported (KanjiVG does not use them).
    """
    tokens = _TOKEN.findall(d)
    subpaths: list[list[np.ndarray]] = []
    cur = np.zeros(2)
    start = np.zeros(2)
    last_ctrl: np.ndarray | None = None  # reflected by S/T
    cmd, prev_cmd, i = None, "", 0
    while i < len(tokens):
        if tokens[i].isalpha():
            cmd = tokens[i]
            i += 1
        elif cmd is None:
            raise ValueError(f"path data must start with a command: {d[:40]!r}")
        up = cmd.upper()
        if up == "A":
            raise ValueError("SVG arc commands are not supported")
        n = _N_ARGS[up]
        raw = tokens[i : i + n]
        if len(raw) < n or any(t.isalpha() for t in raw):
            raise ValueError(f"command {cmd!r} is missing arguments in {d[:40]!r}")
        args = np.array([float(x) for x in raw])
        i += n
        rel = cmd.islower()
        base = np.resize(cur, n) if rel and up not in "HV" else 0.0
        pts: np.ndarray
        if up == "M":
            cur = start = args + base
            subpaths.append([cur[None].copy()])
            cmd = "l" if rel else "L"  # further pairs are implicit line-tos
            last_ctrl, prev_cmd = None, "M"
            continue
        if not subpaths:
            subpaths.append([cur[None].copy()])
        if up == "Z":
            pts, last_ctrl = start[None].copy(), None
        elif up in "LHV":
            nxt = cur.copy()
            if up == "L":
                nxt = args + base
            elif up == "H":
                nxt[0] = args[0] + (cur[0] if rel else 0.0)
            else:
                nxt[1] = args[0] + (cur[1] if rel else 0.0)
            pts, last_ctrl = nxt[None], None
        else:
            a = (args + base).reshape(-1, 2)
            if up in "ST":
                refl = (
                    2 * cur - last_ctrl
                    if last_ctrl is not None
                    and prev_cmd in (("C", "S") if up == "S" else ("Q", "T"))
                    else cur.copy()
                )
                a = np.vstack([refl, a])
            ctrl = np.vstack([cur, a])
            pts = _bezier(ctrl, curve_step)
            last_ctrl = ctrl[-2]
        subpaths[-1].append(pts)
        cur = pts[-1].copy()
        prev_cmd = up
    return [np.concatenate(p, axis=0) for p in subpaths]


def load_svg_strokes(path: str | Path, curve_step: float = 1.0) -> Sketch:
    """Read every ``<path>`` of an SVG file in document order; each subpath is one stroke.

    KanjiVG files hold one path per stroke in writing order, so this yields the strokes
    in writing order.
    """
    root = ET.parse(path).getroot()
    strokes: Sketch = []
    for el in root.iter():
        if el.tag.rsplit("}", 1)[-1] == "path" and el.get("d"):
            strokes.extend(parse_svg_path(el.get("d", ""), curve_step))
    return strokes


def kanjivg_dir() -> Path:
    """Directory holding the KanjiVG SVGs installed by the ``kanjivg`` package."""
    try:
        dist = importlib.metadata.distribution("kanjivg")
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            "KanjiVG data not found: install it with `pip install kanjivg` "
            "(or `pip install sparsediff[kanjivg]`), or pass a directory of KanjiVG SVG files"
        ) from None
    return Path(str(dist.locate_file("kanji")))


def list_kanjivg_files(
    directory: str | Path | None = None, exclude_variants: bool = True
) -> list[Path]:
    """Sorted KanjiVG SVG files; variant files (``05b57-Kaisho.svg``) are dropped by default."""
    root = Path(directory) if directory is not None else kanjivg_dir()
    files = sorted(root.glob("*.svg"))
    if exclude_variants:
        files = [f for f in files if "-" not in f.stem]
    return files


def load_kanjivg(
    files: Sequence[str | Path], curve_step: float = 1.0
) -> tuple[list[Sketch], LoadReport]:
    """Parse KanjiVG SVG files into sketches, skipping (and counting) unreadable ones."""
    report, sketches = LoadReport(), []
    errors = (ET.ParseError, ValueError, OSError)
    for f in files:
        report.read(sketches, lambda f=f: load_svg_strokes(f, curve_step), errors, "parse_error")
    return sketches, report
