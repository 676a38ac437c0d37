"""TensorBoard event files: the metrics.jsonl scalars, sample grids and evaluation metrics,
read back with TensorBoard's own reader; each step once, also across a kill and a resume."""

import json
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from sparsediff.cli import main
from sparsediff.training.tensorboard import EventLog, available, stage_dir
from sparsediff.workflows import evaluate

TRAIN_SCALARS = ("loss", "lr", "density", "churn", "itop_rate", "update_time_s", "steps_per_s")


class MeanFeatures(nn.Module):
    """Stands in for Inception: per-channel means and spreads."""

    def forward(self, images):
        x = images.float() / 255
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


def train(run, *sets, resume=False):
    args = ["train", "chirodiff-tiny", "--run-dir", str(run), "--threads", "1"]
    for s in ("train.progress=false", "data.max_train=24", "train.sample_every=3", *sets):
        args += ["--set", s]
    assert main([*args, "--resume"] if resume else args) == 0


def read_events(run):
    events = EventAccumulator(str(stage_dir(run)), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def steps(events, tag):
    return [e.step for e in events.Scalars(tag)]


def jsonl(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def next_second():
    """Events files sort by their start second: a real resume is a later process; here the
    next phase runs in the same process and may start within the same second."""
    start = int(time.time())
    while int(time.time()) == start:
        time.sleep(0.05)


def test_training_scalars_grids_and_evaluation(tmp_path, single_thread):
    run = tmp_path / "run"
    train(run, "data.max_train=40")  # a test split big enough for precision/recall
    events = read_events(run)
    tags = events.Tags()
    assert {f"train/{key}" for key in TRAIN_SCALARS} <= set(tags["scalars"])
    assert "train/time" not in tags["scalars"] and "train/step" not in tags["scalars"]
    records = jsonl(run)
    assert steps(events, "train/loss") == [r["step"] for r in records] == [2, 4, 6]
    for key in TRAIN_SCALARS:
        logged = [e.value for e in events.Scalars(f"train/{key}")]
        assert logged == pytest.approx([r[key] for r in records], rel=1e-6), key
    # the training-time grid at step 3 and the final samples.png at step 6
    assert [e.step for e in events.Images("samples")] == [3, 6]
    assert events.Images("samples")[-1].width > 16

    record = evaluate(
        run, feature_module=MeanFeatures(), cache_dir=tmp_path / "cache", progress=False
    )
    events = read_events(run)
    name = Path(record.record).stem  # eval-ddpm10-eta0-n6-seed0-ema
    fid = events.Scalars(f"{name}/fid")
    assert [(e.step, e.value) for e in fid] == [(6, pytest.approx(record.metrics["fid"]))]
    assert {f"{name}/{k}" for k in ("kid_mean", "precision", "recall")} <= set(
        events.Tags()["scalars"]
    )


def test_resume_logs_each_step_once(tmp_path, single_thread):
    run = tmp_path / "run"
    train(run, "train.stop_at=3")
    shutil.copy(run / "checkpoint.pt", tmp_path / "step3.pt")
    next_second()
    train(run, "train.stop_at=5", resume=True)  # logs steps 4 and 5 ...
    shutil.copy(tmp_path / "step3.pt", run / "checkpoint.pt")  # ... then dies: back to step 3
    next_second()
    train(run, resume=True)

    assert len(list(stage_dir(run).glob("events.out.tfevents.*"))) == 3
    events = read_events(run)
    records = jsonl(run)
    assert steps(events, "train/loss") == [r["step"] for r in records] == [2, 3, 4, 6]
    assert steps(events, "train/density") == [2, 3, 4, 6]
    logged = [e.value for e in events.Scalars("train/loss")]
    assert logged == pytest.approx([r["loss"] for r in records], rel=1e-6)
    assert [e.step for e in events.Images("samples")] == [3, 6]


def test_switched_off(tmp_path, single_thread):
    run = tmp_path / "run"
    train(run, "train.tensorboard=false")
    assert (run / "metrics.jsonl").exists()
    assert not (run / "tensorboard").exists()


def test_off_without_the_package(tmp_path, monkeypatch):
    assert available()
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    assert not available()
    events = EventLog(tmp_path / "tb")
    events.resume_at(3)
    events.scalars(4, {"loss": 1.0})
    events.close()
    assert not (tmp_path / "tb").exists()
