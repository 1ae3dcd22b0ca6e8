"""Reading checkpoint files safely and writing every output file atomically.

Reading always uses ``torch.load(weights_only=True)`` (or safetensors), and every way a file can be wrong
becomes one :class:`CheckpointError` naming the file. Writing goes to a temporary file in the same folder
followed by an atomic rename, so a crash or ``kill -9`` never leaves a half-written file behind.
"""
import csv
import io
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence

import torch

from .errors import CheckpointError

# Wrappers around the weights that training scripts commonly save; checked in this order.
_STATE_DICT_KEYS = ('model', 'state_dict')
# Prefixes added by DistributedDataParallel and torch.compile.
_WRAPPER_PREFIXES = ('module.', '_orig_mod.')


def load_file(path) -> Any:
    """Load a ``.pth`` / ``.pt`` / ``.safetensors`` file with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'checkpoint file not found: {path}')
    if path.suffix == '.safetensors':
        from safetensors import SafetensorError
        from safetensors.torch import load_file as load_safetensors
        try:
            return load_safetensors(str(path), device='cpu')
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f'{path} is not a valid safetensors file ({e})') from None
    with open(path, 'rb') as f:
        magic = f.read(4)
    # torch.save writes a zip archive; files from torch < 1.6 are a bare pickle (protocol byte 0x80)
    if magic != b'PK\x03\x04' and magic[:1] != b'\x80':
        raise CheckpointError(f'{path} is not a PyTorch checkpoint (.pth) or safetensors file')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f'{path} holds Python objects other than tensors and plain containers; it is '
                              f'not loaded because unpickling them could run arbitrary code') from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError) as e:
        raise CheckpointError(f'{path} is corrupt or truncated ({type(e).__name__}: {str(e)[:80]})') from None


def unwrap_state_dict(checkpoint: Any, source: str = 'checkpoint') -> Dict[str, torch.Tensor]:
    """Return the tensor state_dict inside a checkpoint (raw, or under ``model`` / ``state_dict``),
    without ``module.`` / ``_orig_mod.`` prefixes."""
    if isinstance(checkpoint, Mapping):
        for key in _STATE_DICT_KEYS:
            if isinstance(checkpoint.get(key), Mapping):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, Mapping) or not checkpoint:
        raise CheckpointError(f'{source} does not contain a state_dict')
    state_dict = {}
    for key, value in checkpoint.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f'{source} is not a state_dict: entry {key!r} is a {type(value).__name__}')
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        state_dict[key] = value
    return state_dict


def read_state_dict(path) -> Dict[str, torch.Tensor]:
    """Read the model weights from a checkpoint file of any of the layouts above."""
    return unwrap_state_dict(load_file(path), source=str(path))


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def atomic_write(path, write_fn: Callable[[str], Any]) -> None:
    """Call ``write_fn(temporary_path)``, then rename the result to ``path`` (creating its folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    os.close(fd)
    try:
        write_fn(tmp)
        with open(tmp, 'rb') as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's file is private (0600); give the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_atomic(obj: Any, path) -> None:
    """``torch.save`` to ``path`` through a temporary file and an atomic rename."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_safetensors_atomic(state_dict: Dict[str, torch.Tensor], path, metadata: Optional[Dict[str, str]] = None):
    """Write a state_dict as safetensors through a temporary file and an atomic rename."""
    from safetensors.torch import save_file
    tensors = {k: v.detach().contiguous() for k, v in state_dict.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def write_text_atomic(path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_csv_atomic(path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())
