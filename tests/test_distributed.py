"""Distributed maths on 2 gloo processes (launched here with torchrun) against one process on the
concatenated batch: the contrastive loss uses global negatives and global BN, so both must agree to fp32
tolerance — loss, and parameters after one optimiser step."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

pytestmark = [pytest.mark.dist, pytest.mark.slow]


def _run(args, world: int, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    if world == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", *args]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


# Known bug, found by this test: under DDP, MoCo v3 with the momentum encoder's BN made global gets the
# single-process loss but not its gradients; without DDP (manual gradient averaging) or with a local-BN key
# encoder the two agree exactly. Left open in the multi-GPU issue.
MOCOV3_DDP_BUG = pytest.mark.xfail(strict=True, reason="DDP + global BN in the momentum encoder: grads differ")


@pytest.mark.parametrize("method", ["simclr", pytest.param("mocov3", marks=MOCOV3_DDP_BUG)])
def test_two_processes_equal_one_process_on_the_concatenated_batch(method, tmp_path):
    if method == "mocov3" and not (ROOT / "fastssl/methods/mocov3.py").exists():
        pytest.skip("MoCo v3 not in this tree")
    results = {}
    for world in (1, 2):
        out = tmp_path / f"w{world}.pt"
        _run([str(ROOT / "tests/_dist_step.py"), str(out), method], world, tmp_path)
        results[world] = torch.load(out, weights_only=True)
    one, two = results[1], results[2]
    assert two["world"] == 2
    torch.testing.assert_close(two["loss"], one["loss"], rtol=1e-5, atol=1e-6)
    assert one["state"].keys() == two["state"].keys()
    moved = 0
    for k, v in one["state"].items():
        if v.is_floating_point():
            torch.testing.assert_close(two["state"][k], v, rtol=1e-4, atol=1e-5, msg=k)
            moved += 1
    assert moved > 10
