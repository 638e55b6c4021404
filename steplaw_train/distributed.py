"""Process group and model-parallel state for one run.

Rank and world size come from torchrun (RANK, WORLD_SIZE, LOCAL_RANK) or SLURM (SLURM_PROCID,
SLURM_NTASKS, SLURM_LOCALID), so the same code runs data-parallel across the GPUs and nodes a SLURM
job is given (NCCL) or across CPU processes (gloo: `torchrun --standalone --nproc_per_node 2 -m
steplaw_train.train ...`, which is how the tests exercise megatron DDP's gradient all-reduce,
per-rank batch slices and multi-rank checkpoints without a GPU). A lone process still needs a
group (megatron-core asks for ranks): size 1, rendezvous through an in-process store (no port).
Only data parallelism is used: Step Law models (<= 1B) fit on one GPU.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _default_master_addr() -> str:
    """Where ranks meet when nothing said so: the job's first node under SLURM (a multi-node job
    launched by plain srun; submitit's jobs export MASTER_ADDR themselves), else this machine.
    127.0.0.1 on a second node is that node's own loopback: the ranks would never meet."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if nodelist and int(os.environ.get("SLURM_NNODES", "1")) > 1:
        import subprocess

        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True
        ).stdout.split()
        if out:
            return out[0]
    return "127.0.0.1"


def _env_int(*names: str, default: int) -> int:
    for n in names:
        if os.environ.get(n):
            return int(os.environ[n])
    return default


# torch's default (10 minutes on NCCL) is shorter than what ranks legitimately wait in a
# collective: rank 0 building a dataset index (data.py) or writing a checkpoint while the others
# sit in megatron's barrier. A genuinely hung job still dies, just later.
PROCESS_GROUP_TIMEOUT = timedelta(minutes=60)


def cuda_device_index(local_rank: int, device_count: int) -> int:
    """The GPU this task uses: its local rank modulo the GPUs it can see.

    A SLURM task may see all GPUs of its node (index = local rank) or, with per-task binding
    (`--gpus-per-task`, `--gpu-bind`), only its own (index 0); the modulo serves both.
    """
    if device_count < 1:
        raise RuntimeError("CUDA is in use but no GPU is visible to this task")
    return local_rank % device_count


def env_world_size() -> int:
    """Processes of this run, from torchrun (WORLD_SIZE) or SLURM (SLURM_NTASKS); 1 alone.
    The one parser of the world size: the trainer's plan and `init` both use it."""
    return _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)


def env_rank() -> int:
    """This process's rank before the process group exists (0 for a lone process)."""
    return 0 if env_world_size() == 1 else _env_int("RANK", "SLURM_PROCID", default=0)


def init(use_cuda: bool) -> World:
    """Initialise torch.distributed and megatron's parallel state (TP = PP = 1)."""
    from megatron.core import parallel_state

    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    world = env_world_size()
    local = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    if world == 1:
        rank, local = 0, 0  # a lone process whatever a stale RANK/LOCAL_RANK says
    if not dist.is_initialized():
        if world == 1:
            # an in-process store: no port to race for (a free port picked on 127.0.0.1 was
            # taken on the node's own address by another job's gloo socket: EADDRINUSE on the
            # multi-node CI cluster) and nothing in os.environ, which child processes and jobs
            # submitted from here would inherit (a stale MASTER_ADDR in a job's environment
            # makes submitit refuse to set up a multi-task job)
            rendezvous = {"store": dist.HashStore()}
        else:
            os.environ.setdefault("MASTER_ADDR", _default_master_addr())
            os.environ.setdefault("MASTER_PORT", "29500")
            rendezvous = {"init_method": "env://"}
        if use_cuda:
            torch.cuda.set_device(cuda_device_index(local, torch.cuda.device_count()))
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            rank=rank,
            world_size=world,
            timeout=PROCESS_GROUP_TIMEOUT,
            **rendezvous,
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            1, 1, distributed_timeout_minutes=int(PROCESS_GROUP_TIMEOUT.total_seconds() // 60)
        )
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    return World(rank=rank, world_size=world, local_rank=local, device=device)


def set_seed(seed: int, use_cuda: bool) -> None:
    """Seed every generator; megatron's CUDA RNG tracker only exists on GPU."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if use_cuda:
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(seed)


def shutdown() -> None:
    """Tear down so that a second run in the same process (tests) starts clean."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
