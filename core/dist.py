"""Process-group set-up read from the environment: one process, torchrun, or Slurm/submitit tasks.

Every stage runs the same code in all three settings. `init_distributed()` exports torchrun-style
variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) when it finds a Slurm or submitit
job and joins the group with `init_method="env://"`: `nccl` on GPU, `gloo` on CPU. All helpers are
no-ops in a single process.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global rank, number of processes, rank on its node, its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def _slurm_env() -> dict[str, str]:
    """torchrun-style variables for a task started by `srun` outside submitit."""
    from submitit.slurm.slurm import SlurmJobEnvironment

    job = SlurmJobEnvironment()
    # `srun` sets the step's task count; a batch script is one process whatever --ntasks says.
    world = os.environ.get("SLURM_STEP_NUM_TASKS", os.environ.get("SLURM_NTASKS", "1"))
    port = os.environ.get("MASTER_PORT", str(20000 + int(job.job_id.split("_")[0]) % 40000))
    return {
        "MASTER_ADDR": job.hostnames[0],
        "MASTER_PORT": port,
        "RANK": str(job.global_rank),
        "WORLD_SIZE": world,
        "LOCAL_RANK": str(job.local_rank),
    }


def export_env() -> None:
    """Fill RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* from a submitit or Slurm job unless already set."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return  # torchrun, or an earlier export
    if "SUBMITIT_EXECUTOR" in os.environ:
        from submitit.helpers import TorchDistributedEnvironment

        # Keep CUDA_VISIBLE_DEVICES: Slurm may already have given each task its own GPU.
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    elif "SLURM_PROCID" in os.environ and "SLURM_JOB_ID" in os.environ:
        for key, value in _slurm_env().items():
            os.environ.setdefault(key, value)


def default_device() -> torch.device:
    """This process's GPU (`cuda:LOCAL_RANK`, wrapped over the visible GPUs) or the CPU."""
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed() -> DistInfo:
    """Join the process group when the environment holds more than one process (idempotent)."""
    export_env()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = default_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not is_distributed():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                                **kwargs)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def is_distributed() -> bool:
    """True inside an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Global rank (0 outside a process group)."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Number of processes (1 outside a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0 writes files, logs and prints."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every process."""
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of `tensor` over all processes (a new tensor; the input is left alone)."""
    out = tensor.detach().clone()
    if is_distributed():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of `tensor` over all processes (floating point)."""
    return all_reduce_sum(tensor.float()) / get_world_size()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` (any picklable value) on every process."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def main_only(fn: Callable[..., T]) -> Callable[..., Optional[T]]:
    """Decorator: run `fn` on rank 0 only; other ranks get None."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Optional[T]:
        return fn(*args, **kwargs) if is_main() else None

    return wrapper


def cleanup() -> None:
    """Leave the process group (safe to call when none was joined)."""
    if is_distributed():
        dist.destroy_process_group()
