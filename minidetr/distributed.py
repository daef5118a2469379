"""Distributed helpers: `torchrun` set-up, rank queries, gathering results.

train.py runs unchanged on one process or under `torchrun --nproc_per_node N train.py ...`:
torchrun sets RANK, WORLD_SIZE and LOCAL_RANK, and we initialise the default process group
from them (env://), with NCCL on CUDA and gloo on the CPU. Every helper below also works
without a process group, as a world of one.
"""
import datetime
import os

import torch
import torch.distributed as dist


def is_dist():
    return dist.is_available() and dist.is_initialized()


def get_rank():
    return dist.get_rank() if is_dist() else 0


def get_world_size():
    return dist.get_world_size() if is_dist() else 1


def is_main_process():
    return get_rank() == 0


def init_distributed(device="cpu", timeout_s=1800):
    """Initialise from torchrun's environment; returns the device this process should use.

    A failing rank must bring the job down rather than leave the others waiting forever
    in a collective: the timeout bounds that wait (torchrun then stops every process).
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return torch.device(device)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = device.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo", init_method="env://",
                            timeout=datetime.timedelta(seconds=timeout_s))
    return torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")


def cleanup():
    if is_dist():
        dist.destroy_process_group()


def all_reduce_mean(value):
    """Mean of a float over all processes (a plain float in, a plain float out)."""
    if not is_dist():
        return float(value)
    t = torch.tensor(float(value), dtype=torch.float64,
                     device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return t.item() / get_world_size()


def all_gather_object(obj):
    """[obj from rank 0, obj from rank 1, ...]; [obj] without a process group."""
    if not is_dist():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier():
    if is_dist():
        dist.barrier()
