"""Distributed start-up for every entry point.

Works under the ``deepspeed`` launcher (which passes ``--local_rank``), torchrun with environment rendezvous, Slurm
(``srun`` without a launcher: SLURM_* variables) and as a plain single process. gloo on CPU, NCCL on GPU.
"""
from __future__ import annotations

import argparse
import gc
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a launcher's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _environment_from_slurm() -> None:
    """Map Slurm's variables onto torch's when a job is started by srun without torchrun or deepspeed."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ or "SLURM_NTASKS" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in os.environ:
        nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST", "127.0.0.1")
        os.environ["MASTER_ADDR"] = first_node(nodes)
    # Every task of the job derives the same port from the job id (SLURM_JOB_ID), so concurrent jobs on a node differ.
    job = os.environ.get("SLURM_JOB_ID", "")
    os.environ.setdefault("MASTER_PORT", str(20000 + int(job) % 20000) if job.isdigit() else "29500")


def first_node(nodelist: str) -> str:
    """The first host of a Slurm node list: "node[01-04,07],gpu5" -> "node01", "gpu-[3,5-7]-ib" -> "gpu-3-ib",
    "a1,a2" -> "a1" (what ``scontrol show hostnames`` would print first)."""
    nodelist = nodelist.strip()
    depth, end = 0, len(nodelist)
    for i, char in enumerate(nodelist):  # the first comma outside brackets ends the first host expression
        depth += (char == "[") - (char == "]")
        if char == "," and depth == 0:
            end = i
            break
    host = nodelist[:end]
    if "[" not in host:
        return host
    prefix, rest = host.split("[", 1)
    ranges, suffix = rest.split("]", 1)
    return prefix + ranges.split(",")[0].split("-")[0] + suffix


def init_distributed(local_rank: int | None = None) -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (idempotent) and return this process's place in the job."""
    _environment_from_slurm()
    if "RANK" not in os.environ:  # a plain `python -m ...` run: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK=str(local_rank or 0))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if local_rank is not None and local_rank >= 0:
        os.environ["LOCAL_RANK"] = str(local_rank)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    elif os.environ.get("SSVAE_DS_SHM_COMM", "0") != "1":
        # DeepSpeed otherwise JIT-compiles a shared-memory comm op with g++ on every CPU start (25-40 s);
        # plain gloo is fast enough for CPU-scale runs.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not dist.is_initialized():
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


@dataclass(frozen=True)
class ParallelGroups:
    """This rank's place in world = data x sequence x tensor parallel (tensor innermost, as Megatron lays it out:
    keep a TP group inside a node). Ranks of one TP group and of one SP group hold the same samples."""

    tensor_parallel_size: int = 1
    sequence_parallel_size: int = 1
    tp_group: object = None  # None when tensor_parallel_size is 1
    sp_group: object = None  # None when sequence_parallel_size is 1
    # The group DeepSpeed reduces gradients over and partitions ZeRO states across: the ranks with this rank's TP
    # rank (SP ranks included: their loss is scaled by the SP size, so the average over it is the SP sum). None
    # when tensor_parallel_size is 1 (then it is the whole world, DeepSpeed's default).
    dp_group: object = None
    data_rank: int = 0  # which share of the data this rank reads (and the seed of its random draws)
    data_world_size: int = 1

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_parallel_size * self.sequence_parallel_size

    def is_group_leader(self, rank: int) -> bool:
        """The first rank of this rank's TP x SP group (the one that writes what the whole group computed)."""
        return rank % self.model_parallel_size == 0


def parallel_groups(tensor_parallel_size: int = 1, sequence_parallel_size: int = 1) -> ParallelGroups:
    """Build the TP, SP and DeepSpeed data-parallel groups of this rank. Rank r is
    ``(data * SP + seq) * TP + tensor``. Collective (``new_group`` is): every rank calls it with the same sizes;
    with both sizes 1 it creates no group."""
    tp, sp = tensor_parallel_size, sequence_parallel_size
    initialized = dist.is_initialized()
    rank = dist.get_rank() if initialized else 0
    world = dist.get_world_size() if initialized else 1
    if tp < 1 or sp < 1 or world % (tp * sp):
        raise ValueError(f"tensor_parallel_size {tp} x sequence_parallel_size {sp} must divide the world size {world}")
    tp_group = sp_group = dp_group = None
    if tp > 1:
        for first in range(0, world, tp):
            group = dist.new_group(list(range(first, first + tp)))
            if first <= rank < first + tp:
                tp_group = group
        for t in range(tp):
            group = dist.new_group(list(range(t, world, tp)))
            if rank % tp == t:
                dp_group = group
    if sp > 1:
        for block in range(0, world, tp * sp):
            for t in range(tp):
                members = [block + s * tp + t for s in range(sp)]
                group = dist.new_group(members)
                if rank in members:
                    sp_group = group
    return ParallelGroups(tp, sp, tp_group, sp_group, dp_group, rank // (tp * sp), world // (tp * sp))


def shutdown_distributed() -> None:
    """End the process group cleanly once every rank got here (all ranks call it): a gloo group torn down by the
    interpreter's exit while its threads still run aborts the process ("terminate called without an active
    exception", seen once in five 2-rank runs before this; Trainer.release frees the engines first)."""
    if not dist.is_initialized():
        return
    gc.collect()  # engines in reference cycles (DeepSpeed's are) and their async work, before the group goes
    barrier()
    dist.destroy_process_group()
    try:
        import deepspeed.comm.comm as ds_comm

        ds_comm.cdb = None  # DeepSpeed's handle on the destroyed group: a later init_distributed starts afresh
    except ImportError:
        pass


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_true(flag: bool) -> bool:
    """True only if ``flag`` is true on every rank (so all ranks take the same branch)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    t = torch.tensor([0.0 if flag else 1.0])
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.item() == 0.0


def parse_entry_args(argv: list[str] | None = None, description: str = "") -> argparse.Namespace:
    """``--config FILE [key=value ...]`` plus the ``--local_rank`` every launcher may pass."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="run YAML (see configs/)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1, help="set by the deepspeed launcher")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the YAML, e.g. run.max_steps=10")
    return parser.parse_args(argv)
