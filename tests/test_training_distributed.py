import torch
import torch.distributed as dist

from sparsediff.training import distributed


def _single_process_env(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


def test_dist_defaults_to_single_process(monkeypatch):
    _single_process_env(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # "auto" on a CPU machine
    info = distributed.setup()
    assert (info.rank, info.world_size, info.local_rank) == (0, 1, 0)
    assert info.device == torch.device("cpu")
    assert info.is_main and not info.enabled
    assert not dist.is_initialized()  # no process group for a single process
    assert distributed.all_mean(2.5, info) == 2.5
    distributed.barrier(info)  # a no-op, does not need a process group


def test_setup_with_explicit_cpu_device(monkeypatch):
    _single_process_env(monkeypatch)
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun with one process
    info = distributed.setup(device="cpu")
    assert info == distributed.Dist(0, 1, 0, torch.device("cpu"))
    assert not info.enabled and not dist.is_initialized()
