"""Sample generation sharded over processes started by torchrun (torch.distributed: gloo on CPU, nccl on GPU).

    torchrun --nproc_per_node 8 -m analysis.cli eval --model facebook/DiT-XL-2-256 --method ptq4dit ...

The images of one evaluation are cut into the batches a single process would sample (batch_size images,
in order) and batch k goes to rank k mod world_size. Every image's noise comes from its own seed and
every batch holds the same images at the same positions as in one process, so each image is computed by
the same kernels on the same shapes: the merged set equals the single-process set, and so does its FID.
Each rank samples its batches; rank 0 gathers them (as uint8 on the CPU), puts them back in order, and is
the only rank that scores and stores. Outside torchrun (WORLD_SIZE unset or 1) everything is one process.
"""
from __future__ import annotations

import atexit
import os

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size): from the process group, or (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env() -> tuple[int, int]:
    """Join the process group torchrun describes in the environment (once); (rank, world size)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or not dist.is_available():
        return world()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_device())
        dist.init_process_group(backend)
        atexit.register(_leave_together)
    return world()


def _leave_together() -> None:
    """At exit, wait for every rank, then close the group. A rank that exited while another was still
    finishing a collective with it (gather_object's last messages) made that rank abort."""
    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def local_device() -> torch.device:
    """This rank's device: cuda:LOCAL_RANK where CUDA is present, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def is_main() -> bool:
    return world()[0] == 0


def shard_batches(n: int, batch_size: int, rank: int, size: int) -> list[int]:
    """Indices of the images rank `rank` samples: whole batches k = rank, rank + size, ..."""
    out = []
    for k, start in enumerate(range(0, n, batch_size)):
        if k % size == rank:
            out.extend(range(start, min(start + batch_size, n)))
    return out


def sample_sharded(sample_fn, labels: list[int], seeds: list[int], batch_size: int) -> tuple[torch.Tensor | None, float]:
    """sample_fn(labels, seeds, batch_size) -> (images [n, C, H, W] in [0, 1], seconds), spread over the ranks.

    Returns (all images in order, the slowest rank's seconds) on rank 0 and (None, seconds) elsewhere; one
    process just calls sample_fn."""
    rank, size = world()
    if size == 1:
        return sample_fn(labels, seeds, batch_size)
    mine = shard_batches(len(labels), batch_size, rank, size)
    images, seconds = (sample_fn([labels[i] for i in mine], [seeds[i] for i in mine], batch_size) if mine
                       else (None, 0.0))
    codes = None if images is None else (images.clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    gathered = [None] * size if rank == 0 else None
    dist.gather_object((mine, codes, seconds), gathered, dst=0)
    if rank != 0:
        return None, seconds
    shape = next(c.shape[1:] for _, c, _ in gathered if c is not None)
    merged = torch.empty((len(labels), *shape), dtype=torch.uint8)
    for idx, c, _ in gathered:
        if idx:
            merged[torch.tensor(idx)] = c
    return merged.float() / 255.0, max(s for _, _, s in gathered)


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()
