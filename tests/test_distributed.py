"""distributed: two gloo processes under DDP give the same gradients as one process on the
whole batch (the loss normaliser is all-reduced, DDP averages gradients)."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import minidetr
from minidetr import distributed

# frozen BN: no batch statistics; fp32 backbone: the check is of DDP's averaging at 1e-6,
# and bf16 rounds differently in a half batch than in the whole one
SMALL = dict(hidden_dim=32, nheads=4, dim_feedforward=64, enc_layers=1, dec_layers=2,
             num_queries=6, num_select=6, dropout=0.0, frozen_bn=True, backbone_precision="fp32")


def make_batch():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, 64, 64, generator=g)
    mask = torch.zeros(4, 64, 64, dtype=torch.bool)
    mask[1, 40:, :] = True
    mask[3, :, 48:] = True
    counts = [2, 0, 3, 1]     # unequal object counts per rank: the normaliser must be global
    targets = [{"labels": torch.randint(1, 7, (n,), generator=g),
                "boxes": torch.cat([torch.rand(n, 2, generator=g) * 0.5 + 0.25,
                                    torch.rand(n, 2, generator=g) * 0.2 + 0.05], 1)} for n in counts]
    return images, mask, targets


def gradients(model, criterion, images, mask, targets):
    out = model(images, mask, targets)
    losses = criterion(out, targets)
    total = sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses)
    total.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    distributed.init_distributed("cpu")
    torch.manual_seed(0)
    model, criterion, _ = minidetr.build("conditional", preset="tiny", **SMALL)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    images, mask, targets = make_batch()
    shard = slice(2 * rank, 2 * rank + 2)
    out = ddp(images[shard], mask[shard], targets[shard])
    losses = criterion(out, targets[shard])
    total = sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses)
    total.backward()
    grads = {n.removeprefix("module."): p.grad for n, p in ddp.named_parameters() if p.grad is not None}
    torch.save(grads, os.path.join(out_dir, f"grads{rank}.pt"))
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_gloo_processes_match_single_process(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    model, criterion, _ = minidetr.build("conditional", preset="tiny", **SMALL)
    expected = gradients(model, criterion, *make_batch())
    for rank in (0, 1):
        got = torch.load(tmp_path / f"grads{rank}.pt", weights_only=True)
        assert set(got) == set(expected)
        for name, g in expected.items():
            assert torch.allclose(got[name], g, atol=1e-6, rtol=1e-4), name


def test_helpers_without_a_process_group():
    """A world of one: rank 0, size 1, gather returns [obj], mean returns the value."""
    assert (distributed.get_rank(), distributed.get_world_size(), distributed.is_main_process()) == (0, 1, True)
    assert distributed.all_gather_object({"a": 1}) == [{"a": 1}]
    assert distributed.all_reduce_mean(2.5) == 2.5
