"""finetune under torchrun: 2 CPU processes over gloo on localhost end with identical weights;
evaluate over a DistributedSampler counts every sample once; distributed=False stays local."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

WORKER = textwrap.dedent('''
    import copy, os, sys
    import torch
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
    import tucker_fx
    from tucker_fx.training import mlp

    out = sys.argv[1]
    rank = int(os.environ["RANK"])
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    y = (x[:, 0] + x[:, 1] > 0).long()
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)
    teacher = mlp([8, 16, 16, 2], seed=0).eval()
    config = tucker_fx.TuckerConfig(rank=4, lowering="none", progress=False)
    student = tucker_fx.compress(teacher, torch.randn(1, 8), config=config).module.requires_grad_(True)
    with torch.no_grad():  # ranks start apart: DDP must broadcast rank 0's weights
        for p in student.parameters():
            p.add_(0.05 * rank)
    start = {k: v.clone() for k, v in student.state_dict().items()}
    hist = tucker_fx.finetune(student, loader, epochs=3, lr=0.01, teacher=teacher, seed=0, quiet=rank != 0)
    if rank == 0:  # inside the group, on one rank only: distributed=False must make no collective call
        local = tucker_fx.finetune(copy.deepcopy(student), loader, epochs=1, distributed=False, quiet=True)
        assert local.world_size == 1 and local.samples == 64, (local.world_size, local.samples)
    # 63 samples on 2 ranks: the sampler repeats one; evaluate must count each sample once
    val = TensorDataset(x[:63], y[:63])
    sampler = DistributedSampler(val, shuffle=True, seed=3)
    ev = tucker_fx.evaluate(student, DataLoader(val, batch_size=8, sampler=sampler))
    full = tucker_fx.evaluate(student, DataLoader(val, batch_size=8))
    torch.save({"start": start, "end": student.state_dict(), "losses": hist.losses, "world": hist.world_size,
                "samples": hist.samples, "steps": hist.steps, "eval": ev.to_dict(), "full": full.to_dict()},
               os.path.join(out, f"rank{rank}.pt"))
''')


@pytest.mark.slow  # two torchrun worker processes: ~10-30 s
def test_torchrun_two_ranks_agree(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    # --standalone: the c10d rendezvous store binds localhost:0 itself and the workers join that store,
    # so no port is picked, released and re-bound (which races with other processes on the machine)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", "2",
           str(script), str(tmp_path)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired as exc:  # pragma: no cover - a hang is a failure, not a stuck suite
        pytest.fail(f"torchrun did not finish in 180 s: {exc.stderr}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["losses"] == r1["losses"] and r0["losses"][-1] < r0["losses"][0]
    assert r0["samples"] == 3 * 64 and r0["steps"] == 3 * 4  # each rank: half of 64 samples, batches of 8
    assert r0["end"].keys() == r1["end"].keys()
    for k in r0["end"]:
        assert torch.equal(r0["end"][k], r1["end"][k]), k
    assert not all(torch.equal(r0["start"][k], r1["start"][k]) for k in r0["start"])  # they did start apart
    assert not all(torch.equal(r0["start"][k], r0["end"][k]) for k in r0["start"])   # and trained
    # evaluate over a DistributedSampler: summed over the ranks, the padded repeat left out
    assert r0["eval"] == r1["eval"]
    assert r0["eval"]["total"] == 63 and r0["eval"]["duplicates_skipped"] == 1
    assert r0["eval"]["correct"] == r0["full"]["correct"] and r0["eval"]["counts"] == r0["full"]["counts"]
