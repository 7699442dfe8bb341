"""Process-group setup for one or many ranks (torchrun, deepspeed, Ray, Slurm set the env)."""
from __future__ import annotations

import os
import socket

import torch


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed() -> None:
    """Join (or, for a lone process, create as rank 0 of 1) the process group, through DeepSpeed.

    torchrun, the deepspeed launcher and Slurm set RANK/WORLD_SIZE/MASTER_*; Ray Train creates the
    group itself before the recipe runs.
    """
    import deepspeed
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    # DeepSpeed JIT-compiles a shared-memory allreduce op with gcc on every CPU init (40-95 s);
    # gloo's allreduce is enough for CPU runs, so mark the op unavailable and skip the build.
    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    launched = any(k in os.environ for k in ("RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"))
    if not torch.distributed.is_initialized() and not launched:
        # a lone process: a group of one over an in-memory store (no port to bind, none to collide);
        # the address variables only tell DeepSpeed that no MPI discovery is needed
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="0")
        torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0, world_size=1)
    deepspeed.init_distributed(dist_backend=backend)


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
