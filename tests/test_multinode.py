"""Multi-node launches on one machine (gloo, CPU): torchrun node agents with c10d rendezvous, losing one node's agent
(the other node checkpoints and stops, the run resumes exactly), and a Slurm job's tasks started without a launcher
(``SLURM_*`` variables as srun sets them). The DiT and the VAE on two node agents: tests/test_reshard.py and
tests/test_vae_data_parallel.py."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infra.distributed import first_node, free_port
from multinode_helpers import ENV, ROOT, run_nodes, start_nodes
from run_helpers import logged_losses

TOY = Path(__file__).parent / "helpers" / "toy_task.py"
STEPS = 24


def toy_args(tmp_path: Path, out: Path, *extra: str) -> list[str]:
    config = tmp_path / "toy.yaml"
    config.write_text(f"run:\n  seed: 3\n  log_every: 1\n  max_steps: {STEPS}\n  ema_decay: 0.9\n")
    return [str(TOY), "--config", str(config), f"run.output_dir={out}", "run.progress_bar=false", *extra]


@pytest.fixture(scope="module")
def one_node(tmp_path_factory):
    """The reference: 2 ranks on one node (torchrun --nproc_per_node 2)."""
    tmp = tmp_path_factory.mktemp("one_node")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           *toy_args(tmp, tmp / "run")]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return logged_losses(tmp / "run")


def test_losing_a_node_agent_checkpoints_on_the_other_and_the_run_resumes_exactly(tmp_path, one_node):
    out = tmp_path / "run"
    nodes = start_nodes(toy_args(tmp_path, out, "step_sleep=0.2"))
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        assert time.time() < deadline and all(n.poll() is None for n in nodes), "the run did not start training"
        time.sleep(0.2)
    nodes[1].send_signal(signal.SIGKILL)  # the second node's agent dies; its worker is left without a launcher
    output = nodes[0].communicate(timeout=120)[0]
    nodes[1].wait(timeout=30)
    assert nodes[0].returncode != 0  # the surviving node's worker stopped early (exit 75), not finished
    assert "checkpointing at step" in output and "preempted at step" in output, output[-3000:]
    saved = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert saved and saved[-1] != f"step_{STEPS:06d}" and not (out / "export.txt").exists()
    run_nodes(toy_args(tmp_path, out))  # the same command again, on both nodes: resumes
    assert logged_losses(out) == one_node  # every step, before and after the loss of the node, bit for bit
    assert (out / "export.txt").is_file()


def test_slurm_tasks_without_a_launcher_train_like_torchrun(tmp_path, one_node):
    """Two tasks as ``srun -N1 -n2`` starts them: only SLURM_* variables (no RANK, WORLD_SIZE, MASTER_ADDR); the
    port follows the job id."""
    out = tmp_path / "run"
    base = {k: v for k, v in ENV.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    job = free_port() - 20000  # the port the tasks derive from the job id is free
    procs = [subprocess.Popen([sys.executable, *toy_args(tmp_path, out)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env={**base, "SLURM_PROCID": str(r), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(r),
                                   "SLURM_JOB_ID": str(job), "SLURM_JOB_NODELIST": "localhost"}) for r in (0, 1)]
    for proc in procs:
        output = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0, output[-3000:]
    assert logged_losses(out) == one_node


@pytest.mark.parametrize("nodelist,first", [("node[01-04,07],gpu5", "node01"), ("gpu-[3,5-7]-ib", "gpu-3-ib"),
                                            ("a1,a2", "a1"), ("localhost", "localhost"), ("n[9]", "n9")])
def test_the_first_node_of_a_slurm_node_list(nodelist, first):
    assert first_node(nodelist) == first


def test_slurm_variables_become_torch_ones(monkeypatch):
    from infra.distributed import _environment_from_slurm

    # A private environment: what the function sets must not leak into this process's later launches.
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
             "SLURM_JOB_NODELIST": "node[07-08]"}
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k not in (
        "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")} | slurm)
    _environment_from_slurm()
    assert {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")} == {
        "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node07", "MASTER_PORT": str(20000 + 3456)}
