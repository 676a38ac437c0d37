"""The presets and study files ship in the wheel and are found next to the installed code."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import sparsediff
from sparsediff.config import (
    CONFIG_DIR,
    STUDY_DIR,
    list_presets,
    list_studies,
    preset_path,
    study_path,
)

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 120  # a build takes a few seconds; the limit only stops a hung one


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """Build the wheel offline from a copy of the project (an in-tree build would write
    build/ and *.egg-info into the working tree)."""
    src = tmp_path_factory.mktemp("project")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(
        ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation"]
    cmd += ["--no-index", "-q", "-w", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    (path,) = out.glob("sparsediff-*.whl")
    return path


def test_wheel_holds_every_preset_and_study(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    presets = {f"sparsediff/configs/{p.name}" for p in CONFIG_DIR.glob("*.toml")}
    studies = {f"sparsediff/configs/studies/{p.name}" for p in STUDY_DIR.glob("*.toml")}
    assert "sparsediff/configs/ldm-tiny.toml" in presets
    assert "sparsediff/configs/studies/quick.toml" in studies
    assert presets | studies <= names
    assert "sparsediff/py.typed" in names


def test_wheel_declares_kanjivg_but_not_the_fid_weights_package(wheel):
    with zipfile.ZipFile(wheel) as zf:
        (meta,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        requires = [
            line.split(":", 1)[1].strip()
            for line in zf.read(meta).decode().splitlines()
            if line.startswith("Requires-Dist:")
        ]
    runtime = [r for r in requires if "extra ==" not in r]
    assert any(r.startswith("kanjivg") for r in runtime)
    assert not any("fid-helper" in r or "fid_helper" in r for r in requires)


def test_presets_found_from_the_unpacked_wheel(wheel, tmp_path):
    # an unpacked pure-Python wheel is what pip installs; import sparsediff from there only
    zipfile.ZipFile(wheel).extractall(tmp_path)
    code = (
        "import sparsediff, sparsediff.config as c; "
        "print(sparsediff.__file__); print(c.preset_path('ldm-tiny')); print(c.study_path('quick'))"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=tmp_path,  # not the checkout: nothing may be found relative to it
        check=True,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    module, preset, study = (Path(line) for line in done.stdout.split())
    package = tmp_path / "sparsediff"
    assert module == package / "__init__.py"
    assert preset == package / "configs" / "ldm-tiny.toml"
    assert study == package / "configs" / "studies" / "quick.toml"


def test_presets_live_in_the_package():
    # the editable install / checkout case: the same place relative to the code
    package = Path(sparsediff.__file__).resolve().parent
    assert preset_path("ldm-tiny") == package / "configs" / "ldm-tiny.toml"
    assert study_path("quick") == package / "configs" / "studies" / "quick.toml"


def test_study_path_takes_a_name_or_a_path(tmp_path, monkeypatch):
    own = tmp_path / "mine.toml"
    own.write_text('name = "mine"\n')
    assert study_path(own) == own
    monkeypatch.chdir(tmp_path)
    assert study_path("mine.toml") == Path("mine.toml")
    with pytest.raises(ValueError, match=r"unknown study 'nope'.*'quick'"):
        study_path("nope")


def test_listings_have_one_line_per_file():
    presets, studies = list_presets(), list_studies()
    assert list(presets) == sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))
    assert list(studies) == sorted(p.stem for p in STUDY_DIR.glob("*.toml"))
    assert presets["ldm-fashion-mnist"].startswith("Latent Diffusion on the built-in Fashion-MNIST")
    assert studies["quick"].startswith("The quick study")
    for about in [*presets.values(), *studies.values()]:
        assert about and "\n" not in about and not about.startswith("#")


def test_listing_falls_back_to_the_pipeline(tmp_path, monkeypatch):
    (tmp_path / "bare.toml").write_text('pipeline = "chirodiff"\n')
    monkeypatch.setattr("sparsediff.config.CONFIG_DIR", tmp_path)
    assert list_presets() == {"bare": "chirodiff pipeline"}
