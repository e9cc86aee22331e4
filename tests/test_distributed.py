"""Distributed maths on 2 gloo processes (launched here with torchrun) against one process on the
concatenated batch: the contrastive loss uses global negatives and global BN, so both must agree to fp32
tolerance — loss, and parameters after one optimiser step."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, free_port

pytestmark = [pytest.mark.dist, pytest.mark.slow]


def _run(args, world: int, tmp_path, launcher: str = "torchrun"):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    others = []  # the other "nodes" of a multi-node launch
    if world == 1:
        cmd = [sys.executable, *args]
    elif launcher == "accelerate":  # the README's command, with the shipped 2-process CPU config
        cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
               str(ROOT / "recipes/accelerate/cpu_2proc.yaml"), "--main_process_port", str(free_port()), *args]
    elif launcher == "nodes":  # recipes/slurm_example.sh's command on 2 "nodes" of this machine, 1 process each
        node = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
                str(ROOT / "recipes/accelerate/multinode_8gpu.yaml"), "--num_machines", str(world),
                "--num_processes", str(world), "--main_process_ip", "127.0.0.1", "--main_process_port",
                str(free_port())]
        others = [subprocess.Popen([*node, "--machine_rank", str(r), *args], cwd=tmp_path, env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                  for r in range(1, world)]
        cmd = [*node, "--machine_rank", "0", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", *args]
    try:
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        for other in others:
            _, err = other.communicate(timeout=60)
            assert other.returncode == 0, err[-4000:]
    finally:  # a failed or hung node 0 must not leave the others waiting for it
        for other in others:
            other.kill()
    return proc


# MoCo v3 once got the single-process loss but other gradients on 2 processes: the CPU global-BN conversion had
# made the frozen momentum encoder's BN parameters trainable, so DDP waited for gradients that never came and
# left their bucket unreduced. The step here goes through the trainer's make_accelerator and global BN.
@pytest.mark.parametrize("method", ["simclr", "mocov3"])
def test_two_processes_equal_one_process_on_the_concatenated_batch(method, tmp_path):
    results = {}
    for world in (1, 2):
        out = tmp_path / f"w{world}.pt"
        proc = _run([str(ROOT / "tests/_dist_step.py"), str(out), method], world, tmp_path)
        assert "Warning" not in proc.stderr, proc.stderr[-2000:]  # no deprecation notice per rank and run
        results[world] = torch.load(out, weights_only=True)
    one, two = results[1], results[2]
    assert two["world"] == 2
    # The trainer's DDP: no buffer broadcast before each forward, gradients as views of its buckets; the
    # equality below is with those options.
    assert two["ddp"] == {"broadcast_buffers": False, "gradient_as_bucket_view": True}
    torch.testing.assert_close(two["loss"], one["loss"], rtol=1e-5, atol=1e-6)
    assert one["state"].keys() == two["state"].keys()
    # The update itself, not only the weights after it: LARS moves a weight matrix by ~5e-4 of its norm, about
    # the weights' own tolerance, so an update that was wrong or missing could hide in the weights' comparison.
    # Float reordering across 2 ranks changes a weight by ~1e-7 of itself, and so an update that is at least
    # 1e-4 of the weights by ~1e-3 of itself.
    moved = []
    for k, v in one["state"].items():
        if v.is_floating_point():
            torch.testing.assert_close(two["before"][k], one["before"][k], rtol=0, atol=0, msg=k)  # same init
            torch.testing.assert_close(two["state"][k], v, rtol=1e-4, atol=1e-5, msg=k)
            d1, d2 = (x.double() - one["before"][k].double() for x in (v, two["state"][k]))
            if d1.norm() > 1e-4 * one["before"][k].double().norm():  # well above the weights' fp32 rounding
                assert (d2 - d1).norm() < 1e-2 * d1.norm(), (k, float((d2 - d1).norm() / d1.norm()))
                moved.append(k)
    # Every kind of parameter moved: LARS's weight matrices and its plain-SGD 1-D parameters (which would show a
    # wrong gradient scale, as LARS's trust ratio hides one in the matrices).
    assert any(k.endswith("conv1.weight") for k in moved) and any(k.endswith(".bias") for k in moved), moved


@pytest.mark.compile
@pytest.mark.slow
@pytest.mark.parametrize("method", ["simclr", "mocov3"])
def test_compiled_networks_on_two_processes_equal_eager_on_one(method, tmp_path):
    """model.compile on 2 gloo processes (global BN's all-reduces inside the compiled encoder, DDP around it):
    the loss and the updated weights of eager single-process training on the concatenated batch."""
    results = {}
    for world, mode in ((1, "ddp"), (2, "compiled")):
        out = tmp_path / f"{mode}{world}.pt"
        _run([str(ROOT / "tests/_dist_step.py"), str(out), method, mode], world, tmp_path)
        results[world] = torch.load(out, weights_only=True)
    one, two = results[1], results[2]
    assert one["graphs"] == 0 and two["graphs"] >= 1  # the 2-process step did run compiled graphs
    # The tolerances of the eager 2-process test above: inductor's reordered reductions stay within them.
    torch.testing.assert_close(two["loss"], one["loss"], rtol=1e-5, atol=1e-6)
    assert one["state"].keys() == two["state"].keys()
    for k, v in one["state"].items():
        if v.is_floating_point():
            torch.testing.assert_close(two["state"][k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_two_process_run_stopped_and_resumed_ends_with_the_same_weights(tmp_path):
    """tools/train.py on 2 gloo processes (global BN, global negatives, each rank its own shard of the views):
    stopped after 3 of 25 steps and resumed, or stopped by SIGTERM to the whole job (a cluster's preemption)
    and resumed, it ends where the uninterrupted 2-process run ends. The uninterrupted run goes through
    `accelerate launch` with recipes/accelerate/cpu_2proc.yaml (the README's command), the others through
    torchrun, and a third through the multi-node config on two "nodes" of one process each: every launcher
    must make the same run."""
    import signal
    import time

    from fastssl.checkpoint import latest_checkpoint
    from fastssl.data.synthetic import make_synthetic_dataset

    data = tmp_path / "ds"
    make_synthetic_dataset(data, classes=2, train_per_class=8, val_per_class=1, size=16, seed=0)

    def args(out, *extra):
        return [str(ROOT / "tools/train.py"), str(ROOT / "recipes/simclr_resnet18_synthetic.yaml"),
                f"data.path={data}/train", "eval.knn_val_path=", f"output_dir={out}", "data.image_size=16",
                "data.batch_size=4", "data.workers=0", "train.max_steps=25", "train.progress=false",
                "train.log_every=1", "method.proj_hidden=32", "method.proj_dim=16", *extra]

    def run(out, *extra, launcher="torchrun"):
        return _run(args(out, *extra), 2, tmp_path, launcher)

    assert "global batch 4 = 2 process(es) x 2" in run(tmp_path / "full", launcher="accelerate").stdout
    run(tmp_path / "part", "train.stop_after_steps=3")
    assert latest_checkpoint(tmp_path / "part").name == "step_00000003"
    run(tmp_path / "part", f"resume={tmp_path / 'part'}")
    load = lambda d: torch.load(latest_checkpoint(d) / "pytorch_model.bin", map_location="cpu", weights_only=True)
    full, resumed = load(tmp_path / "full"), load(tmp_path / "part")
    assert latest_checkpoint(tmp_path / "part").name == "step_00000025" and full.keys() == resumed.keys()
    for k, v in full.items():
        torch.testing.assert_close(resumed[k], v, rtol=1e-5, atol=1e-6, msg=k)

    sig = tmp_path / "sig"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    job = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            *args(sig)], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not ((sig / "metrics.jsonl").is_file() and len((sig / "metrics.jsonl").read_text().splitlines()) >= 3):
            assert job.poll() is None and time.time() < deadline, job.stderr.read()[-4000:] if job.poll() else "slow"
            time.sleep(0.02)
        os.killpg(job.pid, signal.SIGTERM)  # torchrun, both ranks: every process of the job, as a cluster does
        # (the processes agree on stopping every AGREE_EVERY = 10 steps: the next one after the signal)
        stdout, stderr = job.communicate(timeout=300)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    stopped = int(latest_checkpoint(sig).name.split("_")[1])
    assert stopped in (10, 20), stderr[-4000:]
    assert (f"SIGTERM received: stopped at step {stopped} of 25, checkpoint written; continue by launching 2 "
            f"processes as before with `tools/train.py {sig / 'config.yaml'} resume={sig}`") in stdout
    run(sig, f"resume={sig}")
    for k, v in load(sig).items():
        torch.testing.assert_close(v, full[k], rtol=1e-5, atol=1e-6, msg=k)
    assert "global batch 4 = 2 process(es) x 2" in run(tmp_path / "nodes", launcher="nodes").stdout
    for k, v in load(tmp_path / "nodes").items():
        torch.testing.assert_close(v, full[k], rtol=1e-5, atol=1e-6, msg=k)
    # Not vacuous: steps 4 to 25 moved the weights well beyond that tolerance.
    at3 = torch.load(tmp_path / "part/checkpoints/step_00000003/pytorch_model.bin", map_location="cpu",
                     weights_only=True)
    assert max((at3[k] - v).abs().max().item() for k, v in full.items() if v.is_floating_point()) > 1e-3


def test_a_one_process_run_resumes_on_two_processes_with_the_same_global_batch(tmp_path):
    """Resuming on another world size is allowed when the global batch stays (it is the recipe's
    data.batch_size: the per-process share follows), says so at start, and trains on to the end; a changed
    global batch is refused before anything runs."""
    import json

    from fastssl.checkpoint import latest_checkpoint
    from fastssl.data.synthetic import make_synthetic_dataset

    data = tmp_path / "ds"
    make_synthetic_dataset(data, classes=2, train_per_class=8, val_per_class=1, size=16, seed=0)
    out = tmp_path / "run"
    args = [str(ROOT / "tools/train.py"), str(ROOT / "recipes/simclr_resnet18_synthetic.yaml"),
            f"data.path={data}/train", "eval.knn_val_path=", f"output_dir={out}", "data.image_size=16",
            "data.batch_size=4", "data.workers=0", "train.max_steps=5", "train.progress=false",
            "train.log_every=1", "method.proj_hidden=32", "method.proj_dim=16"]
    _run([*args, "train.stop_after_steps=3"], 1, tmp_path)
    refused = subprocess.run([sys.executable, *args[:6], "data.batch_size=8", *args[7:], f"resume={out}"],
                             cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True)
    assert refused.returncode != 0 and "data.batch_size: 4 -> 8" in refused.stderr, refused.stderr
    resumed = _run([*args, f"resume={out}"], 2, tmp_path).stdout
    assert "resuming a run saved on 1 process(es) on 2: same global batch 4" in resumed
    assert "global batch 4 = 2 process(es) x 2" in resumed
    assert latest_checkpoint(out).name == "step_00000005"
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]
    load = lambda step: torch.load(out / f"checkpoints/step_{step:08d}/pytorch_model.bin", map_location="cpu",
                                   weights_only=True)
    at3, at5 = load(3), load(5)
    assert max((at3[k] - v).abs().max().item() for k, v in at5.items() if v.is_floating_point()) > 1e-3


def _agreement_worker(rank: int, init_file: str, out_dir: str) -> None:
    import types

    import torch.distributed as dist

    from fastssl.errors import UserError
    from fastssl.errors import from_main, raise_together
    from fastssl.step import leave_together

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    acc = types.SimpleNamespace(num_processes=2)
    seen = {"from_main": from_main(acc, f"rank {rank}'s view")}
    # A stop signal that reached rank 1 only: both stop, at the next agreement step (no collective between).
    from fastssl.preempt import AGREE_EVERY, StopRequest

    request = StopRequest()
    acc.device = torch.device("cpu")
    seen["agreed"] = [request.agreed(acc, AGREE_EVERY)]
    request.received = "SIGTERM" if rank == 1 else None
    seen["agreed"] += [request.agreed(acc, AGREE_EVERY + 1), request.agreed(acc, 2 * AGREE_EVERY)]
    raise_together(acc, None)  # nobody failed: nobody raises
    try:
        raise_together(acc, "rank 1's file is unreadable" if rank == 1 else None)
        seen["raised"] = None
    except UserError as e:
        seen["raised"] = str(e)
    torch.save(seen, f"{out_dir}/rank{rank}.pt")
    leave_together()


def test_a_failure_or_stop_signal_on_one_rank_reaches_every_rank_and_main_decides(tmp_path):
    # A rank that raised alone would leave the others at their next collective until its timeout (10 min).
    import torch.multiprocessing as mp

    mp.spawn(_agreement_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        seen = torch.load(tmp_path / f"rank{rank}.pt")
        assert seen == {"from_main": "rank 0's view", "raised": "rank 1's file is unreadable",
                        "agreed": [None, None, "SIGTERM" if rank == 1 else "a signal on another process"]}


@pytest.mark.parametrize("method", ["simclr", "mocov2", "mocov3"])
def test_ddp_reduces_gradients_like_a_plain_all_reduce(method, tmp_path):
    """On 2 processes, the trainer's DDP (make_accelerator) must leave the parameters where a plain all-reduce
    of the same local gradients does: the check that caught MoCo v3's unreduced bucket, for every
    method (MoCo v2's Shuffle BN has no 1-process equivalent, so this is its distributed-gradient oracle)."""
    results = {}
    for reduction in ("ddp", "manual"):
        out = tmp_path / f"{reduction}.pt"
        _run([str(ROOT / "tests/_dist_step.py"), str(out), method, reduction], 2, tmp_path)
        results[reduction] = torch.load(out, weights_only=True)
    ddp, manual = results["ddp"], results["manual"]
    torch.testing.assert_close(ddp["loss"], manual["loss"], rtol=1e-6, atol=1e-7)
    for k, v in manual["state"].items():
        if v.is_floating_point():
            torch.testing.assert_close(ddp["state"][k], v, rtol=1e-5, atol=1e-6, msg=k)


def _mocov2_cfg():
    from fastssl.config import config_from_dict

    return config_from_dict(dict(data=dict(batch_size=8, image_size=16), model=dict(encoder="resnet18",
                                 small_input=True), method=dict(name="mocov2", queue_size=16, proj_layers=2,
                                                                proj_hidden=16, proj_dim=8, shuffle_bn_splits=2)))


def _mocov2_global_batch():
    g = torch.Generator().manual_seed(123)
    return tuple(torch.randn(8, 3, 16, 16, generator=g) for _ in range(2))


def _mocov2_queue_worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from fastssl.methods import build_method
    from fastssl.step import leave_together
    from pipelines.base import ViewBatch

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)  # the same weights and initial queue on every rank (what DDP's broadcast gives)
    method = build_method(_mocov2_cfg())
    views = _mocov2_global_batch()
    local = ViewBatch(tuple(v[rank * 4:(rank + 1) * 4] for v in views), torch.zeros(4, dtype=torch.long),
                      torch.arange(rank * 4, (rank + 1) * 4))
    torch.manual_seed(11)  # the forward's one draw: rank 0's randperm(8), broadcast as the Shuffle BN permutation
    method(local)
    method.after_step(0, 1)
    torch.save({"queue": method.queue.ordered().clone(), "ptr": int(method.queue.ptr)}, f"{out_dir}/queue{rank}.pt")
    leave_together()


def test_mocov2_queue_on_two_processes_takes_the_whole_global_batchs_keys_in_rank_order(tmp_path):
    """MoCo enqueues the keys of the global batch (main_moco.py's concat_all_gather before _dequeue_and_enqueue):
    after one step on 2 gloo processes, each rank's queue is the previous queue followed by the 8 keys of both
    ranks, rank 0's images first. Oracle, computed here on one process without the library's gather or
    Shuffle BN code: He et al. 2020 sec. 3.3 written out -- the key network on the global batch shuffled by
    the same permutation, one BN group per process's share, un-shuffled, L2-normalised."""
    import torch.multiprocessing as mp
    import torch.nn.functional as F

    from fastssl.methods import build_method

    mp.spawn(_mocov2_queue_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    method = build_method(_mocov2_cfg())
    before = method.queue.ordered().clone()
    x_k = _mocov2_global_batch()[1]
    torch.manual_seed(11)
    perm = torch.randperm(8)
    net = torch.nn.Sequential(method.key_encoder, method.key_projector).train()
    with torch.no_grad():
        shuffled = torch.cat([net(share) for share in x_k[perm].chunk(2)])  # process r encodes share r
    keys = torch.empty_like(shuffled)
    keys[perm] = shuffled
    expect = torch.cat([before[8:], F.normalize(keys, dim=1)])
    for rank in (0, 1):
        seen = torch.load(tmp_path / f"queue{rank}.pt")
        assert seen["ptr"] == 8, rank  # a rank enqueueing only its own 4 keys would stop at 4
        torch.testing.assert_close(seen["queue"], expect, rtol=1e-5, atol=1e-6, msg=f"rank {rank}")
