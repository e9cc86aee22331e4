"""Global negatives across 2 gloo processes equal the single-process loss on the concatenated batch.

The oracle is the single-process run on the concatenated global batch (itself checked against the float64
numpy oracle in test_losses.py / test_losses_triton.py). Each rank encodes its own slice with a Linear layer
wrapped in DistributedDataParallel and computes the loss with the negatives of both ranks. Asserted, per
loss form and impl (as dist.py explains):
  - the mean of the ranks' losses equals the single-process loss;
  - each rank's projections receive WORLD times the single-process gradient of those rows (every rank's loss
    back-propagates into them through gather_with_grad);
  - after DDP averages over the ranks, the Linear layer's gradient equals the single-process one.
This file is also the worker: `python tests/test_losses_dist.py OUT_DIR` under RANK/WORLD_SIZE/MASTER_*.
"""

from __future__ import annotations

import datetime
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import free_port

WORLD, N_LOCAL, IN, D, QUEUE = 2, 5, 12, 16, 9
FORMS = ("nt_xent", "info_nce", "info_nce_queue")
IMPLS = ("naive", "chunked") + (("triton",) if importlib.util.find_spec("triton") else ())


def _run(form: str, impl: str, rank: int, world: int, ddp: bool) -> dict:
    """Encode rows [rank*n, (rank+1)*n) of both global views (all rows when world == 1) and back-propagate."""
    from fastssl import losses

    torch.manual_seed(0)
    encoder = torch.nn.Linear(IN, D)
    g = torch.Generator().manual_seed(1)
    x_a, x_b = (torch.randn(N_LOCAL * WORLD, IN, generator=g) for _ in range(2))
    queue = torch.randn(QUEUE, D, generator=g)
    n = N_LOCAL * WORLD // world
    rows = slice(rank * n, (rank + 1) * n)
    model = torch.nn.parallel.DistributedDataParallel(encoder) if ddp else encoder
    z = model(torch.cat([x_a[rows], x_b[rows]]))  # one forward per backward, as DDP wants
    z.retain_grad()
    if form == "nt_xent":
        loss = losses.nt_xent(z[:n], z[n:], 0.2, impl=impl)
    else:
        loss = losses.info_nce(z[:n], z[n:], 0.2, queue=queue if form == "info_nce_queue" else None, impl=impl)
    loss.backward()
    return {"loss": loss.item(), "z_grad": z.grad, "weight_grad": encoder.weight.grad, "bias_grad": encoder.bias.grad}


def _worker(out_dir: Path) -> None:
    import torch.distributed as dist

    from fastssl.step import leave_together

    rank = int(os.environ["RANK"])
    results = {}
    if rank == 0:  # the single-process reference, before any process group exists
        results["single"] = {(f, i): _run(f, i, 0, 1, ddp=False) for f in FORMS for i in IMPLS}
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    results["dist"] = {(f, i): _run(f, i, rank, WORLD, ddp=True) for f in FORMS for i in IMPLS}
    leave_together()
    torch.save(results, out_dir / f"rank{rank}.pt")


@pytest.mark.dist
def test_global_negatives_match_single_process_on_concatenated_batch(tmp_path):
    root = Path(__file__).resolve().parents[1]
    base = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root), MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(free_port()), WORLD_SIZE=str(WORLD), TRITON_INTERPRET="1")
    procs = [subprocess.Popen([sys.executable, __file__, str(tmp_path)], cwd=root, env=dict(base, RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(WORLD)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    # fp32 with the sums split across ranks in a different order: agreement to a few ulps of the values.
    close = dict(rtol=1e-5, atol=1e-7)
    for key, single in ranks[0]["single"].items():
        dist_runs = [r["dist"][key] for r in ranks]
        assert sum(r["loss"] for r in dist_runs) / WORLD == pytest.approx(single["loss"], rel=1e-6), key
        n = N_LOCAL
        for rank, run in enumerate(dist_runs):
            own = torch.cat([single["z_grad"][rank * n:(rank + 1) * n],
                             single["z_grad"][WORLD * n + rank * n:WORLD * n + (rank + 1) * n]])
            torch.testing.assert_close(run["z_grad"], WORLD * own, **close, msg=str(key))
            torch.testing.assert_close(run["weight_grad"], single["weight_grad"], **close, msg=str(key))
            torch.testing.assert_close(run["bias_grad"], single["bias_grad"], **close, msg=str(key))


def test_gather_is_the_identity_on_one_process():
    from fastssl.losses import dist

    x = torch.randn(3, 4, requires_grad=True)
    assert dist.rank_and_world() == (0, 1)
    assert dist.gather_with_grad(x) is x


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
