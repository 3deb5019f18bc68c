"""Every collective `softpo train` uses, one helper per pattern: whether the run has one process or several
(`world > 1`) is decided here and nowhere else in the loop.

Each helper is called by every rank at the same point of the loop, with the same arguments shape; on one
process each is the identity (or a no-op).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def start_processes(args) -> tuple[int, int, torch.device]:
    """(world, rank, device) from torchrun's environment; gloo on the CPU, nccl on GPUs (one per rank)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if world > 1 or args.fsdp:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(args.threads or 1)
    return world, rank, device


def end_processes(world: int) -> None:
    """Tear down together: a rank that leaves while rank 0 still writes the plot can abort in gloo."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def raise_on_every_rank(compute, world: int, what: str):
    """compute() on this rank; if it raised on any rank, every rank raises, naming the rank and its error.
    User code (a reward function) may fail on one rank only: alone, that rank would leave the others
    waiting in their next collective."""
    try:
        value, error = compute(), None
    except Exception as exc:  # noqa: BLE001 -- any failure of user code is reported on every rank
        value, error = None, exc
    mine = None if error is None else f"{type(error).__name__}: {error}"
    errors = [mine]
    if world > 1:
        errors = [None] * world
        dist.all_gather_object(errors, mine)
    failed = [(rank, message) for rank, message in enumerate(errors) if message is not None]
    if failed:
        rank, message = failed[0]
        where = f" on rank {rank}" if world > 1 else ""
        raise RuntimeError(f"{what} failed{where}: {message}") from error
    return value


def same_on_every_rank(value, world: int):
    """Rank 0's `value` (any picklable object) on every rank."""
    if world == 1:
        return value
    shared = [value]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def sum_over_ranks(tensor: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(tensor)
    return tensor


def any_rank(flag: int, world: int) -> int:
    """The largest of every rank's `flag` (0 = nothing to report): one small all-reduce."""
    if world == 1:
        return flag
    value = torch.tensor([flag], dtype=torch.long)
    if dist.get_backend() == "nccl":
        value = value.cuda()
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value.item())


def gather_objects(value, world: int) -> list:
    """Every rank's `value` (any picklable object), in rank order, on every rank."""
    if world == 1:
        return [value]
    gathered = [None] * world
    dist.all_gather_object(gathered, value)
    return gathered


def gather_varying(tensor: torch.Tensor, world: int) -> torch.Tensor:
    """Every rank's 1-d tensor, concatenated in rank order, when ranks hold different lengths."""
    if world == 1:
        return tensor
    lengths = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(world)]
    dist.all_gather(lengths, torch.tensor([tensor.numel()], device=tensor.device))
    longest = int(max(length.item() for length in lengths))
    padded = torch.zeros(longest, dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.numel()] = tensor
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat([part[: int(length.item())] for part, length in zip(gathered, lengths)])


def gather_over_ranks(tensor: torch.Tensor, world: int) -> torch.Tensor:
    """Every rank's rows, concatenated in rank order (every rank holds as many as the others)."""
    if world == 1 or tensor.numel() == 0:
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(gathered, tensor)
    return torch.cat(gathered)


def reduce_metrics(values: dict, world: int, device) -> dict:
    """Average across minibatches (lists) and ranks; *_min and *_max keep their extreme."""
    out = {}
    for key, items in sorted(values.items()):
        op = min if key.endswith("_min") else max if key.endswith("_max") else None
        out[key] = op(items) if op else sum(items) / len(items)
    if world > 1:
        for suffix, op in (("_min", dist.ReduceOp.MIN), ("_max", dist.ReduceOp.MAX), ("", dist.ReduceOp.SUM)):
            keys = [k for k in out if k.endswith(suffix) and (suffix or not k.endswith(("_min", "_max")))]
            buffer = torch.tensor([out[k] for k in keys], dtype=torch.float64, device=device)
            dist.all_reduce(buffer, op=op)
            for key, value in zip(keys, buffer.tolist()):
                out[key] = value / world if not suffix else value
    return out


def average_gradients(params, world):
    """DDP's gradient average, as one flat all-reduce (nothing to do on one rank)."""
    if world == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset: offset + g.numel()].view_as(p).clone()
        offset += g.numel()


def broadcast_from_first_rank(model: torch.nn.Module, device: torch.device) -> None:
    """Copy rank 0's parameters and buffers to every rank, in place; tensors not on `device` (a model kept on
    the CPU until FSDP2 moves it) pass through `device` one at a time, as NCCL needs."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    for tensor in model.state_dict().values():
        if tensor.device == device:
            dist.broadcast(tensor, src=0)
        else:
            staged = tensor.to(device)
            dist.broadcast(staged, src=0)
            tensor.copy_(staged)
