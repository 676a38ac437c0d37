import datetime
import gc

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sparse_helpers import make_sparse
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def _worker(rank, world, init_file, out_dir):
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        torch.set_num_threads(1)
        torch.save(_train_and_check(rank), f"{out_dir}/rank{rank}.pt")
        # Tear down only when both ranks are done with every collective, and after the DDP
        # wrappers (which hold the process group and its gloo work) are gone, so no gloo thread
        # outlives the group into interpreter shutdown.
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _train_and_check(rank):
    results = {}
    for method in ("rigl", "magran"):
        torch.manual_seed(rank)  # different init per rank; DDP broadcasts rank 0's
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        ddp = DistributedDataParallel(model)
        opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
        sparse = make_sparse(
            ddp, opt, method=method, prune_schedule="cosine", total_steps=10, seed=5
        )
        data = torch.Generator().manual_seed(100 + rank)  # every rank sees other data
        for _ in range(6):
            opt.zero_grad()
            ddp(torch.randn(8, 8, generator=data)).pow(2).mean().backward()
            opt.step()
        results[method] = {
            "masks": {n: m.clone() for n, m in sparse.masks.items()},
            "weights": {n: p.detach().clone() for n, p in model.named_parameters()},
            "consistent": sparse.verify_consistent(),
            "churn": sparse.stats()["dropped"],
        }
    if rank == 1:  # break one mask on one rank: every rank must notice
        sparse.masks["2.weight"].view(-1)[0] ^= True
    # The check is one all-reduce whose result every rank reads, so both ranks raise together.
    try:
        sparse.verify_consistent()
        results["detected"] = ""
    except RuntimeError as err:
        results["detected"] = str(err)
    return results


def test_two_ranks_keep_identical_masks(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for method in ("rigl", "magran"):
        a, b = r0[method], r1[method]
        assert list(a["masks"]) == ["0.weight", "2.weight"]  # no "module." prefix
        assert a["churn"] > 0  # masks did change, identically
        assert all(torch.equal(a["masks"][n], b["masks"][n]) for n in a["masks"])
        assert all(torch.equal(a["weights"][n], b["weights"][n]) for n in a["weights"])
        assert a["consistent"] is True and b["consistent"] is True
    assert "2.weight" in r0["detected"] and "2.weight" in r1["detected"]
