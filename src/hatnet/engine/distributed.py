"""Process-group set-up for ``torchrun`` and the few collective helpers tasks need.

``torchrun`` starts one process per device and sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` and the
rendezvous address; :func:`setup` joins the group through ``env://`` (gloo on CPU, nccl on CUDA). Outside
torchrun every helper here degrades to the single-process answer, so tasks call them unconditionally.
"""
import os
from contextlib import contextmanager
from typing import Any, Iterator, List, Sequence, Union

import torch
import torch.distributed as dist

from ..errors import HatNetError


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """True on the one process that writes files and prints (rank 0)."""
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(values: Union[torch.Tensor, Sequence[float]], device=None) -> torch.Tensor:
    """Element-wise sum over all processes (a float64 tensor; the input is not modified).

    Typical use in ``Task.evaluate``: ``correct, total = all_reduce_sum([correct, total]).tolist()``.
    """
    tensor = torch.as_tensor(values, dtype=torch.float64).clone()
    if not is_distributed():
        return tensor
    if dist.get_backend() == 'nccl':
        device = device or torch.device('cuda', torch.cuda.current_device())
        reduced = tensor.to(device)
        dist.all_reduce(reduced)
        return reduced.cpu()
    dist.all_reduce(tensor)
    return tensor


def all_gather_object(obj: Any) -> List[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every process (any picklable object)."""
    if not is_distributed():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def resolve_device(name: str = 'auto') -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` -> a device; under torchrun ``cuda`` means ``cuda:LOCAL_RANK``."""
    name = (name or 'auto').lower()
    if name == 'auto':
        name = 'cuda' if torch.cuda.is_available() else 'cpu'
    if name.startswith('cuda') and not torch.cuda.is_available():
        raise HatNetError(f'--device {name}: CUDA is not available on this machine (use --device cpu)')
    if name == 'cuda':
        return torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
    try:
        return torch.device(name)
    except RuntimeError:
        raise HatNetError(f'unknown device {name!r} (use auto, cpu, cuda or cuda:N)') from None


@contextmanager
def setup(device_name: str = 'auto') -> Iterator[torch.device]:
    """Resolve the device and, when launched by torchrun with more than one process, join the process group
    for the duration of the block (left again on exit, also on errors)."""
    device = resolve_device(device_name)
    launched = int(os.environ.get('WORLD_SIZE', '1')) > 1 and not is_distributed()
    if launched:
        if device.type == 'cuda':
            torch.cuda.set_device(device)
        dist.init_process_group(backend='nccl' if device.type == 'cuda' else 'gloo', init_method='env://')
    try:
        yield device
    finally:
        if launched:
            dist.destroy_process_group()
