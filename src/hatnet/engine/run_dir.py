"""A run directory: what a run writes there, which process owns it, and which outputs may go there.

* **One owner.** The process that trains or resumes a run holds its lock, ``.hatnet.lock``: a file created
  exclusively (it appears with its content, or not at all) that names the owner's pid, host and start time.
  A second ``train`` or a ``--resume`` of a run that is still going fails with one line naming that process.
  A lock left by a process that no longer runs on this host (``kill -9``, a crash, a reboot) is stale and
  is taken over (by one process only, when several start at once); a lock of another host cannot be checked
  from here and counts as held.
* **Only a run's own files.** ``--overwrite`` removes what runs and the eval commands write (:data:`OWN_FILES`,
  :data:`OWN_FOLDERS`) and refuses a folder that holds anything else, so a mistyped ``--out`` never deletes
  a project folder. The temporary files of checkpoint writes that a killed process left behind are removed
  at the next start of the run.
* **Outputs never replace a run's files.** Predictions, exports and reports may be written anywhere the user
  says (:func:`check_outputs`), but never over a training file of a run, and over another existing file only
  with ``--overwrite``.
"""
import fnmatch
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Iterable, List, Optional, Tuple

from ..errors import CheckpointError, HatNetError, OutputError
from ..fileio import writing
from .checkpoint import BEST, LAST
from .logs import CURVES_PNG, METRICS_CSV, TENSORBOARD

CONFIG_YAML = 'config.yaml'
LOG_TXT = 'log.txt'
LOCK = '.hatnet.lock'

#: what training writes into a run directory; predictions and exports never replace these
TRAINING_FILES = (CONFIG_YAML, LAST, BEST, METRICS_CSV, CURVES_PNG, LOG_TXT, LOCK)
#: the reports the eval commands and the demo write into a run directory by default
EVAL_FILES = ('confusion_matrix.png', 'per_class.csv', 'seg_eval_*.csv')
#: every file name (fnmatch pattern) a run directory may hold
OWN_FILES = TRAINING_FILES + EVAL_FILES
#: folders a run directory may hold (fnmatch pattern -> the file names they may hold)
OWN_FOLDERS = {TENSORBOARD: ('events.out.tfevents.*',), 'eval-*': ('confusion_matrix.png', 'per_class.csv')}


def _is_own_file(name: str, patterns: Iterable[str]) -> bool:
    """A file a run writes, or the temporary file of an atomic write of one (``.NAME.XXXXXXXX.tmp``)."""
    if name.startswith('.') and name.endswith('.tmp') and name.count('.') >= 3:
        name = name[1:-len('.tmp')].rsplit('.', 1)[0]
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def run_contents(run_dir: Path) -> Tuple[List[Path], List[Path]]:
    """(the run's own files and folders, everything else) in ``run_dir``."""
    own, foreign = [], []
    for entry in sorted(run_dir.iterdir()):
        if entry.is_dir() and not entry.is_symlink():
            allowed = next((files for pattern, files in OWN_FOLDERS.items() if fnmatch.fnmatchcase(entry.name, pattern)),
                           None)
            mine = allowed is not None and all(f.is_file() and _is_own_file(f.name, allowed) for f in entry.iterdir())
        else:
            mine = entry.is_file() and _is_own_file(entry.name, OWN_FILES)
        (own if mine else foreign).append(entry)
    return own, foreign


def is_run_dir(folder: Path) -> bool:
    """Whether ``folder`` is (or was) a training run's directory."""
    return any((folder / name).is_file() for name in (CONFIG_YAML, LAST, BEST))


# ---------------------------------------------------------------------------------------------- the lock
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, run by another user
        return True
    return True


def _create_exclusive(path: Path, text: str) -> None:
    """Create ``path`` holding ``text``, or raise FileExistsError: a hard link of a complete temporary file, so
    that a reader never sees the lock without its content (O_EXCL where the file system has no hard links)."""
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    try:
        with os.fdopen(fd, 'w') as f:
            f.write(text)
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise
        except OSError:
            with open(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644), 'w') as f:
                f.write(text)
    finally:
        os.unlink(tmp)


class RunLock:
    """The lock of one run directory: ``acquire()`` takes it (or raises naming its live owner), leaving the
    ``with`` block releases it. :meth:`check` only looks."""

    def __init__(self, run_dir):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK
        self.held = False

    def owner(self, path: Optional[Path] = None) -> Optional[dict]:
        """The lock's content (pid, host, started), None if there is no lock."""
        try:
            owner = json.loads((path or self.path).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            owner = None
        if not isinstance(owner, dict) or not isinstance(owner.get('pid'), int):
            return {'pid': None, 'host': None}  # not a lock hatnet wrote: nobody can be asked, so it is stale
        return owner

    def _live_owner(self) -> Optional[dict]:
        owner = self.owner()
        if owner is None or owner['pid'] is None:
            return None
        if owner.get('host') == socket.gethostname() and not _alive(owner['pid']):
            return None
        return owner

    def _in_use(self, owner: dict) -> HatNetError:
        host = owner.get('host')
        where = 'this host' if host == socket.gethostname() else f'host {host}'
        return HatNetError(f'{self.run_dir} is in use by process {owner["pid"]} on {where} (started '
                           f'{owner.get("started", "?")}): wait for that run to end, or if that process is gone, '
                           f'delete {self.path}')

    def check(self) -> None:
        """Raise if a live process holds the lock."""
        owner = self._live_owner()
        if owner is not None:
            raise self._in_use(owner)

    def acquire(self) -> None:
        content = json.dumps(dict(pid=os.getpid(), host=socket.gethostname(),
                                  started=time.strftime('%Y-%m-%d %H:%M:%S')))
        with writing(self.path):
            for _ in range(3):
                try:
                    _create_exclusive(self.path, content)
                    self.held = True
                    return
                except FileExistsError:
                    owner = self._live_owner()
                    if owner is not None:
                        raise self._in_use(owner) from None
                    self._break_stale(self.owner())
        raise self._in_use(self.owner() or {'pid': '?'})

    def _break_stale(self, stale: Optional[dict]) -> None:
        """Remove the lock whose content was ``stale``, and only that one: when two processes find the same stale
        lock, the first may have replaced it with its own live lock by the time the second removes "it". The
        lock is moved aside atomically and read again; a lock that is not the stale one is put back."""
        moved = self.path.with_name(f'{LOCK}.{os.getpid()}.stale.tmp')
        try:
            os.rename(self.path, moved)
        except FileNotFoundError:
            return
        try:
            if self.owner(moved) != stale:
                try:
                    os.link(moved, self.path)
                except FileExistsError:  # yet another process took it meanwhile: its lock stands
                    pass
        finally:
            moved.unlink(missing_ok=True)

    def release(self) -> None:
        if self.held:
            owner = self.owner()
            if owner is not None and owner.get('pid') == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> 'RunLock':
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


# ---------------------------------------------------------------------------------------------- starting a run
def check_start(run_dir: Path, resume: bool, overwrite: bool, locked: bool = False) -> None:
    """Refuse to start in ``run_dir`` unless it is new or empty, or asked to continue (``resume``) or replace
    (``overwrite``) the run there, and never while another process owns it. Only looks: nothing is written.
    ``locked``: this process holds the lock (:func:`prepare` checks again then)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise HatNetError(f'run directory {run_dir} is a file')
    if not run_dir.is_dir():
        if resume:
            raise CheckpointError(f'cannot resume: {run_dir} does not exist')
        return
    if not locked:
        RunLock(run_dir).check()
    if resume:
        if not (run_dir / LAST).is_file():
            raise CheckpointError(f'cannot resume: {run_dir} has no checkpoint ({LAST}); the run stopped before '
                                  f'its first checkpoint, start it again with --overwrite')
        return
    if not any(entry.name != LOCK or not locked for entry in run_dir.iterdir()):
        return
    if not overwrite:
        raise HatNetError(f'run directory {run_dir} already exists: pass --resume to continue that run or '
                          f'--overwrite to replace it')
    if not (run_dir / CONFIG_YAML).is_file():
        raise HatNetError(f'{run_dir} is not empty and is not a hatnet run directory; not overwriting it')
    _, foreign = run_contents(run_dir)
    if foreign:
        names = ', '.join(p.name + ('/' if p.is_dir() else '') for p in foreign[:5]) + (' ...' if len(foreign) > 5
                                                                                         else '')
        raise HatNetError(f'{run_dir} holds {len(foreign)} file(s) or folder(s) that runs do not write ({names}); '
                          f'not overwriting it: move them away or choose another --out')


def prepare(run_dir: Path, lock: RunLock, resume: bool, overwrite: bool) -> None:
    """Create ``run_dir`` and take its lock; check again (a run may have started or ended there since
    :func:`check_start`); remove the temporary files a killed process left and, with ``overwrite``, the
    previous run's files."""
    with writing(run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
    lock.acquire()
    check_start(run_dir, resume, overwrite, locked=True)
    own, _ = run_contents(run_dir)
    for path in own:
        if path == lock.path:
            continue
        if path.is_dir():
            if overwrite:
                shutil.rmtree(path)
        elif overwrite or path.name.endswith('.tmp'):
            path.unlink()


# ---------------------------------------------------------------------------------------------- outputs
def check_outputs(paths: Iterable, overwrite: bool = False) -> None:
    """Check, before anything is computed, that output files may be written: none is a folder or a training file
    of a run directory (:data:`TRAINING_FILES`), and none exists already unless ``overwrite``."""
    for path in map(Path, paths):
        if path.is_dir():
            raise OutputError(f'{path} is a folder; give a file name')
        if path.name in TRAINING_FILES and is_run_dir(path.parent):
            raise OutputError(f'{path} is a file of the training run in {path.parent}; write the output elsewhere')
        if path.exists() and not overwrite:
            raise OutputError(f'{path} exists already (pass --overwrite to replace it)')
        if not path.parent.is_dir() and path.parent.exists():
            raise OutputError(f'{path.parent} is a file, not a folder')


def check_output_folder(folder) -> None:
    """An output folder must be a folder or not exist yet."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f'{folder} is a file; give a folder for the outputs')
