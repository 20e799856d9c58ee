"""Device choice and the distributed (``torchrun``) context."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from ..errors import InputError


@dataclass
class DistributedContext:
    """Where this process runs: ``rank`` of ``world_size`` on ``device``."""

    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def stop_file_seen(self, stop_file: str) -> bool:
        """Whether rank 0 sees ``stop_file``, agreed by every rank (only rank 0 reads the run folder,
        and all ranks must leave the loop at the same step or the next collective hangs)."""
        flag = os.path.exists(stop_file) if self.is_main else False
        if self.distributed:
            import torch.distributed as dist

            tensor = torch.tensor([1 if flag else 0], device=self.device)
            dist.broadcast(tensor, src=0)
            flag = bool(tensor.item())
        return flag


def choose_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` -> the CUDA GPU of this rank if there is one, else the CPU."""
    name = (name or "auto").lower()
    if name not in ("auto", "cpu", "cuda") and not name.startswith("cuda:"):
        raise InputError(f"unknown device {name!r}", path="--device", fix="use auto, cpu, cuda or cuda:N")
    if name == "cpu":
        return torch.device("cpu")
    if name == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise InputError("CUDA was asked for, but PyTorch sees no GPU", path="--device",
                         fix="use --device cpu, or install a CUDA build of PyTorch (see README, 'GPU install')")
    if name.startswith("cuda:"):
        return torch.device(name)
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def setup_distributed(device_name: str = "auto") -> DistributedContext:
    """Join the process group when started by ``torchrun`` (WORLD_SIZE > 1); gloo on CPU, NCCL on GPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = choose_device(device_name, local_rank)
    if world_size > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            if device.type == "cuda":
                torch.cuda.set_device(device)
            import_before_process_group()
            dist.init_process_group(backend=backend)
    return DistributedContext(device=device, rank=rank, local_rank=local_rank, world_size=world_size)


def import_before_process_group() -> None:
    """Import ``torch._dynamo`` before the process group exists, so that ``destroy_process_group`` can free it.

    Call it before every ``init_process_group`` (``setup_distributed`` does).

    ``DistributedDataParallel`` imports ``torch._dynamo`` when it is built.
    Imported after ``init_process_group``, it leaves a reference to the group
    that ``destroy_process_group`` does not drop (measured with torch 2.13 and
    gloo): the group then outlives teardown with its three native threads
    (``gloo_tcp_loop`` and two ``pt_gloo_runloop``).  When one of those
    threads releases its last collective's tensors while the interpreter is
    shutting down, it must take the GIL; Python ends such a thread with
    ``pthread_exit``, whose unwinding through a ``noexcept`` C++ frame calls
    ``std::terminate``: the rank dies with SIGABRT, "terminate called without
    an active exception", after its work is done.  Imported first, the group
    is destroyed and its threads joined inside ``destroy_process_group``.
    """
    import torch._dynamo  # noqa: F401  (imported for its side effect on teardown, see above)


def teardown_distributed(context: DistributedContext) -> None:
    """Destroy the process group; with ``import_before_process_group`` this joins its threads."""
    if context.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


@contextmanager
def distributed(device_name: str = "auto") -> Iterator[DistributedContext]:
    """``setup_distributed`` for the body of a ``with`` block, torn down however the block ends."""
    context = setup_distributed(device_name)
    try:
        yield context
    finally:
        teardown_distributed(context)
