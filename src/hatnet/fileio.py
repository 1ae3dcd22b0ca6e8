"""Reading checkpoint files safely, keeping dataset file names inside their root, and writing every output
file atomically.

Reading always uses ``torch.load(weights_only=True)`` (or safetensors), and every way a file can be wrong
becomes one :class:`CheckpointError` naming the file. Writing goes to a temporary file in the same folder
followed by an atomic rename, so a crash or ``kill -9`` never leaves a half-written file behind; a write that
fails for a reason the user can fix (a full disk, a read-only or forbidden folder) removes its temporary file,
leaves the previous file as it was, and is one :class:`OutputError` naming the file and the free space.
"""
import csv
import errno
import io
import os
import pickle
import shutil
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, Mapping, Optional, Sequence

import torch

from .errors import CheckpointError, DatasetError, OutputError

# Failed writes the user can fix: no space or quota left, a read-only file system, no permission, a file size limit.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG})

# Wrappers around the weights that training scripts commonly save; checked in this order.
_STATE_DICT_KEYS = ('model', 'state_dict')
# Prefixes added by DistributedDataParallel and torch.compile.
_WRAPPER_PREFIXES = ('module.', '_orig_mod.')


# A training run's checkpoints (engine/checkpoint.py writes them): the ``format`` they carry, and the two files.
RUN_FORMAT = 'hatnet-run'
RUN_BEST, RUN_LAST = 'best.pth', 'last.pth'


def run_checkpoint_file(path) -> Path:
    """A run directory means its best checkpoint; any other path is itself."""
    path = Path(path)
    if not path.is_dir():
        return path
    if not (path / RUN_BEST).is_file():
        hint = f' (use {path / RUN_LAST} for its latest weights)' if (path / RUN_LAST).is_file() else ''
        raise CheckpointError(f'{path} is a folder without {RUN_BEST}: not a run directory, or its run has not '
                              f'finished an evaluation yet{hint}')
    return path / RUN_BEST


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


def resolve_inside(root, name: Any, source: str = 'a dataset file') -> Path:
    """``root / name`` for a file name read from a dataset file (e.g. a COCO ``file_name``).

    The name must be a relative path that stays inside ``root``: an absolute path or one that leads out with
    ``..`` is one DatasetError. The check is on the name alone, so the message is the same whether or not
    something exists at the outside path.
    """
    if not isinstance(name, str) or not name or '\0' in name:
        raise DatasetError(f'{source} gives the file name {name!r}; expected a relative path inside {root}')
    normalized = os.path.normpath(name)
    if os.path.isabs(normalized) or normalized.split(os.sep)[0] == os.pardir:
        raise DatasetError(f'{source} gives the file name {name!r}, which is outside {root}: file names must be '
                           f'relative paths inside it')
    return Path(root) / normalized


def _human_bytes(count: float) -> str:
    for unit in ('bytes', 'kB', 'MB', 'GB', 'TB'):
        if count < 1000 or unit == 'TB':
            return f'{count:.0f} {unit}' if unit == 'bytes' else f'{count:.1f} {unit}'
        count /= 1000


def free_space(path) -> str:
    """The space left on the file system that holds ``path`` (or its nearest existing parent), e.g. '1.2 GB'."""
    folder = Path(path).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return _human_bytes(shutil.disk_usage(folder).free)
    except OSError:
        return 'unknown space'


@contextmanager
def writing(path) -> Iterator[None]:
    """Turn a write to ``path`` that fails for a reason the user can fix (:data:`WRITE_ERRNOS`) into one
    :class:`OutputError` naming the path and the free space; other errors pass unchanged."""
    try:
        yield
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        raise OutputError(f'cannot write {path}: {e.strerror or e} ({free_space(path)} free there)') from None


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def atomic_write(path, write_fn: Callable[[str], Any]) -> None:
    """Call ``write_fn(temporary_path)``, then rename the result to ``path`` (creating its folder).

    A failure leaves ``path`` as it was and removes the temporary file; a full disk or a read-only or forbidden
    folder is one :class:`OutputError` (see :func:`writing`).
    """
    path = Path(path)
    with writing(path):
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


class _KeptWriteError:
    """A file whose failed write is kept: torch's checkpoint writer turns it into a RuntimeError that does not say
    why (e.g. 'unexpected pos 704 vs 598' at a file size limit), so the OSError with its errno is raised instead."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.file.flush()


def _torch_save(obj: Any, path: str) -> None:
    with open(path, 'wb') as f:
        kept = _KeptWriteError(f)
        try:
            torch.save(obj, kept)
        except RuntimeError:
            if kept.error is None:
                raise
            raise kept.error from None


def save_atomic(obj: Any, path) -> None:
    """``torch.save`` to ``path`` through a temporary file and an atomic rename."""
    atomic_write(path, lambda tmp: _torch_save(obj, tmp))


def save_safetensors_atomic(state_dict: Dict[str, torch.Tensor], path, metadata: Optional[Dict[str, str]] = None):
    """Write a state_dict as safetensors through a temporary file and an atomic rename."""
    from safetensors.torch import save
    tensors = {k: v.detach().contiguous() for k, v in state_dict.items()}
    data = save(tensors, metadata=metadata)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def save_figure(figure, path, dpi: int = 110) -> None:
    """A matplotlib figure as a PNG, written atomically (and closed)."""
    import matplotlib.pyplot as plt
    try:
        atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=dpi, format='png'))
    finally:
        plt.close(figure)


def append_text(path, text: str) -> None:
    """Append to a log file (a failed write is one :class:`OutputError`, as for the atomic writes)."""
    with writing(path), open(path, 'a') as f:
        f.write(text)


def write_text_atomic(path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_csv_atomic(path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())
