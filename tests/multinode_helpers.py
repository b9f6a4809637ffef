"""Launch a training as several torchrun node agents on this machine: ``--nnodes N`` with c10d rendezvous on
127.0.0.1, one agent process per "node", as on a cluster without a hostfile."""
import os
import subprocess
import sys
import uuid
from pathlib import Path

from infra.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}


def agent_command(target: list[str], nnodes: int, nproc_per_node: int, port: int, run_id: str,
                  host: bool) -> list[str]:
    # is_host: the first agent serves the rendezvous store, as the agent on the endpoint's host does on a cluster
    # (on one machine every agent could, and whichever won would take the store down with it when killed).
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc_per_node={nproc_per_node}",
            "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id={run_id}", "--max_restarts=0",
            f"--rdzv_conf=is_host={int(host)}", *target]


def start_nodes(target: list[str], nnodes: int = 2, nproc_per_node: int = 1) -> list[subprocess.Popen]:
    """Start ``nnodes`` agents running ``target`` (``-m module args`` or ``script args``)."""
    port, run_id = free_port(), uuid.uuid4().hex[:8]
    return [subprocess.Popen(agent_command(target, nnodes, nproc_per_node, port, run_id, node == 0), cwd=ROOT,
                             env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for node in range(nnodes)]


def run_nodes(target: list[str], nnodes: int = 2, nproc_per_node: int = 1, timeout: int = 600) -> list[str]:
    """Run the agents to completion; every one must succeed. Returns their outputs."""
    procs = start_nodes(target, nnodes, nproc_per_node)
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, f"node agent failed ({proc.returncode}):\n{output[-4000:]}"
    return outputs
