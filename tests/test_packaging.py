"""The presets and study files ship in the wheel and are found next to the installed code;
the wheel alone, installed in a fresh venv, trains, exports and samples through diffusers."""

import os
import shutil
import site
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
    extras = {r.split("extra ==")[1].strip(" '\"") for r in requires if "extra ==" in r}
    assert {"tensorboard", "dev"} <= extras
    assert not any(r.startswith("tensorboard") for r in runtime)  # optional


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
    assert studies["quick"].startswith("The main job")
    for about in [*presets.values(), *studies.values()]:
        assert about and "\n" not in about and not about.startswith("#")


def test_listing_falls_back_to_the_pipeline(tmp_path, monkeypatch):
    (tmp_path / "bare.toml").write_text('pipeline = "chirodiff"\n')
    monkeypatch.setattr("sparsediff.config.CONFIG_DIR", tmp_path)
    assert list_presets() == {"bare": "chirodiff pipeline"}


def fresh_venv(root):
    """A new venv that sees this environment's dependencies but not sparsediff itself.

    The dependencies come offline from the running environment's site-packages, through a
    folder of links that leaves out sparsediff's own editable install (its .pth, its
    dist-info) so that only the wheel can provide ``sparsediff``.
    """
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=TIMEOUT_S)
    deps = root / "deps"
    deps.mkdir()
    for site_dir in site.getsitepackages():
        for entry in Path(site_dir).iterdir():
            skip = entry.name.startswith(("sparsediff", "__editable__")) or entry.suffix == ".pth"
            if not skip and not (deps / entry.name).exists():
                (deps / entry.name).symlink_to(entry)
    (purelib,) = (venv / "lib").glob("python3*/site-packages")
    (purelib / "dependencies.pth").write_text(f"{deps}\n")  # after the venv's own packages
    return venv


def test_wheel_works_in_a_fresh_venv(wheel, tmp_path, fmnist_dir):
    venv = fresh_venv(tmp_path)
    bin_dir = venv / "bin"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env |= {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": f"{bin_dir}:{env['PATH']}"}

    def run(*command):
        done = subprocess.run(
            command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
        )
        assert done.returncode == 0, f"{command}: {done.stderr[-3000:]}"
        return done.stdout

    python = str(bin_dir / "python")
    run(python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel))
    assert "ldm-tiny" in run(str(bin_dir / "sparsediff"), "presets")
    train = ["train", "ldm-tiny", "--steps", "5", "--run-dir", "R", "--threads", "1"]
    run("sparsediff", *train, "--set", f"data.path={fmnist_dir}", "--set", "train.progress=false")
    assert (tmp_path / "R" / "done.json").exists()
    run("sparsediff", "export", "R", "--out", "E")
    code = (
        "import sparsediff, torch; from diffusers import DiffusionPipeline\n"
        "torch.set_num_threads(1)\n"
        "pipe = DiffusionPipeline.from_pretrained('E')\n"
        "pipe.set_progress_bar_config(disable=True)\n"
        "out = pipe(batch_size=1, num_inference_steps=3,\n"
        "           generator=torch.Generator().manual_seed(0), output_type='np')\n"
        "print(sparsediff.__file__); print(*out.images.shape)\n"
    )
    module, shape = run(python, "-c", code).splitlines()[-2:]
    assert Path(module).is_relative_to(venv)  # the wheel's code, not the checkout's
    assert shape.split() == ["1", "32", "32", "1"]
