"""Faults around a run directory: one owner at a time, --overwrite only of a run's own files, failed writes,
leftovers of killed processes, resume with other batch settings, outputs that would replace a run's files."""
import errno
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hatnet.engine import train
from hatnet.engine.run_dir import LOCK, RunLock, check_outputs
from hatnet.errors import CheckpointError, HatNetError, OutputError
from hatnet.fileio import atomic_write, save_atomic
from test_engine import ToyConfig, ToyTask, _cfg, one_thread  # noqa: F401  (autouse fixture)


def _write_lock(run: Path, pid: int, host: str = None) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / LOCK).write_text(json.dumps(dict(pid=pid, host=host or socket.gethostname(), started='then')))


@pytest.fixture
def live_process():
    """The pid of a process that runs for the test's duration (the owner of a lock)."""
    proc = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
    yield proc.pid
    proc.kill()
    proc.wait()


@pytest.fixture
def finished_pid():
    proc = subprocess.Popen([sys.executable, '-c', 'pass'])
    proc.wait()
    return proc.pid


@pytest.fixture
def done_run(tmp_path):
    run = tmp_path / 'run'
    train(ToyTask(), _cfg(run, iters=4))
    return run


# ---------------------------------------------------------------------------------------------- one owner
@pytest.mark.parametrize('settings', [dict(), dict(resume=True), dict(overwrite=True)])
def test_a_run_in_use_is_refused_naming_its_owner(done_run, live_process, settings):
    before = (done_run / 'last.pth').read_bytes()
    _write_lock(done_run, live_process)
    with pytest.raises(HatNetError, match=f'in use by process {live_process} on this host'):
        train(ToyTask(), _cfg(done_run, iters=8, **settings))
    assert (done_run / 'last.pth').read_bytes() == before and (done_run / LOCK).exists()


def test_a_lock_of_another_host_counts_as_held(done_run):
    _write_lock(done_run, os.getpid(), host='gpu-node-7')
    with pytest.raises(HatNetError, match='in use by process .* on host gpu-node-7'):
        train(ToyTask(), _cfg(done_run, iters=8, resume=True))


def test_a_stale_lock_and_leftover_temporary_checkpoints_are_cleared_on_resume(done_run, finished_pid):
    _write_lock(done_run, finished_pid)  # kill -9 leaves the lock and a half-written checkpoint behind
    leftover = done_run / '.last.pth.k1ll3d9x.tmp'
    leftover.write_bytes(b'half a checkpoint')
    foreign = done_run / '.notes.txt.abcdefgh.tmp'  # not a temporary file of the run's: kept
    foreign.write_text('an editor\'s')
    train(ToyTask(), _cfg(done_run, iters=8, resume=True))
    assert not leftover.exists() and not (done_run / LOCK).exists() and foreign.exists()
    assert torch.load(done_run / 'last.pth', weights_only=True)['step'] == 8


def test_the_lock_is_held_while_training_and_released_however_the_run_ends(tmp_path):
    class Watching(ToyTask):
        def train_step(self, model, batch, device):
            lock = json.loads((tmp_path / 'run' / LOCK).read_text())
            assert lock['pid'] == os.getpid() and lock['host'] == socket.gethostname()
            return super().train_step(model, batch, device)

    train(Watching(), _cfg(tmp_path / 'run', iters=2))
    assert not (tmp_path / 'run' / LOCK).exists()
    with pytest.raises(RuntimeError, match='simulated crash'):
        train(ToyTask(ToyConfig(crash_at=2)), _cfg(tmp_path / 'crashed', iters=4))
    assert not (tmp_path / 'crashed' / LOCK).exists()


def test_lock_acquire_is_exclusive(tmp_path):
    first, second = RunLock(tmp_path), RunLock(tmp_path)
    first.acquire()
    with pytest.raises(HatNetError, match=f'in use by process {os.getpid()}'):
        second.acquire()
    first.release()
    second.acquire()
    assert json.loads((tmp_path / LOCK).read_text())['pid'] == os.getpid()
    second.release()
    assert not (tmp_path / LOCK).exists()


def test_breaking_a_stale_lock_never_removes_a_live_one_taken_meanwhile(tmp_path, live_process, finished_pid):
    # two starts found the same stale lock; the first has already replaced it with its own (live) lock when the
    # second comes to remove the stale one
    _write_lock(tmp_path, finished_pid)
    late = RunLock(tmp_path)
    stale = late.owner()
    _write_lock(tmp_path, live_process)
    late._break_stale(stale)
    assert late.owner()['pid'] == live_process
    with pytest.raises(HatNetError, match=f'in use by process {live_process}'):
        late.acquire()
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK]  # nothing moved aside is left behind
    _write_lock(tmp_path, finished_pid)  # the stale lock itself is broken and taken over
    late.acquire()
    assert late.owner()['pid'] == os.getpid()
    late.release()


@pytest.mark.slow
def test_two_real_trainings_into_one_directory(tmp_path):
    """A second start and a --resume while another process trains there: both refused, the first run intact."""
    run = tmp_path / 'run'
    code = ('import sys, torch; sys.path.insert(0, sys.argv[1]); torch.set_num_threads(1); '
            'from test_engine import ToyConfig, ToyTask, _cfg, train; '
            'train(ToyTask(ToyConfig(step_sleep=0.2)), _cfg(sys.argv[2], iters=30, eval_every=10))')
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, '-c', code, str(Path(__file__).parent), str(run)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (run / 'last.pth').exists():
            time.sleep(0.05)
        for settings in (dict(), dict(resume=True), dict(overwrite=True)):
            with pytest.raises(HatNetError, match=f'in use by process {proc.pid}'):
                train(ToyTask(), _cfg(run, iters=30, eval_every=10, **settings))
        assert proc.wait(timeout=120) == 0
    finally:
        proc.kill()
    assert torch.load(run / 'last.pth', weights_only=True)['step'] == 30 and not (run / LOCK).exists()


# ---------------------------------------------------------------------------------------------- --overwrite
def test_overwrite_refuses_a_folder_holding_anything_a_run_does_not_write(done_run):
    """`hatnet train --data proj/mydata --out proj --overwrite` on a project folder that also holds a run."""
    project = done_run
    (project / 'notes.md').write_text('my notes')
    (project / 'mydata' / 'train').mkdir(parents=True)
    (project / 'mydata' / 'train' / 'img.png').write_bytes(b'x')
    with pytest.raises(HatNetError, match=r"holds 2 file\(s\) or folder\(s\) that runs do not write \(mydata/, notes.md\)"):
        train(ToyTask(), _cfg(project, iters=4, overwrite=True))
    assert (project / 'notes.md').read_text() == 'my notes' and (project / 'mydata' / 'train' / 'img.png').exists()
    assert (project / 'last.pth').exists()
    # a folder named like the run's eval reports, holding something else, is not the run's either
    (project / 'notes.md').unlink()
    (project / 'mydata').rename(project / 'eval-mydata-val')
    with pytest.raises(HatNetError, match=r'eval-mydata-val/'):
        train(ToyTask(), _cfg(project, iters=4, overwrite=True))


def test_overwrite_replaces_a_run_with_its_eval_reports(done_run):
    reports = [done_run / 'eval-digits-val' / 'confusion_matrix.png', done_run / 'eval-digits-val' / 'per_class.csv',
               done_run / 'seg_eval_val.csv', done_run / '.best.pth.a1b2c3d4.tmp']
    for path in reports:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b'x')
    train(ToyTask(), _cfg(done_run, iters=2, overwrite=True))
    assert not any(path.exists() for path in reports) and not (done_run / 'eval-digits-val').exists()
    assert torch.load(done_run / 'last.pth', weights_only=True)['step'] == 2


# ---------------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize('changed', [dict(batch_size=16), dict(accum_steps=2)])
def test_resume_with_other_batch_settings_is_refused(done_run, changed):
    before = (done_run / 'config.yaml').read_text()
    name, value = next(iter(changed.items()))
    with pytest.raises(CheckpointError, match=f'written with {name} .*this run has {name} {value}'):
        train(ToyTask(), _cfg(done_run, iters=8, resume=True, **changed))
    assert (done_run / 'config.yaml').read_text() == before and not (done_run / LOCK).exists()


def test_resume_on_a_changed_training_set_is_refused(tmp_path):
    train(ToyTask(), _cfg(tmp_path / 'run', epochs=1))
    with pytest.raises(CheckpointError, match='batches per epoch, the data now gives'):
        train(ToyTask(ToyConfig(n_train=48)), _cfg(tmp_path / 'run', epochs=2, resume=True))


# ---------------------------------------------------------------------------------------------- failed writes
def _failing_after(count: int, error: int):
    """A stand-in for fileio._torch_save: the first ``count`` saves work, the next writes half a file and fails."""
    from hatnet import fileio
    real, calls = fileio._torch_save, []

    def save(obj, path):
        calls.append(path)
        if len(calls) <= count:
            return real(obj, path)
        Path(path).write_bytes(b'half')
        raise OSError(error, os.strerror(error), path)
    return save


@pytest.mark.parametrize('error', [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_a_failed_checkpoint_write_is_one_error_and_keeps_the_previous_checkpoints(tmp_path, monkeypatch, error):
    from hatnet import fileio
    run = tmp_path / 'run'
    monkeypatch.setattr(fileio, '_torch_save', _failing_after(2, error))  # best.pth + last.pth at step 4
    with pytest.raises(OutputError) as info:
        train(ToyTask(), _cfg(run, iters=8))
    message = str(info.value)
    assert message.startswith(f'cannot write {run}/') and os.strerror(error) in message
    assert message.endswith('free there)') and len(message.splitlines()) == 1
    assert torch.load(run / 'last.pth', weights_only=True)['step'] == 4
    assert torch.load(run / 'best.pth', weights_only=True)['step'] == 4
    assert not list(run.glob('.*.tmp')) and not (run / LOCK).exists()


def test_a_failed_write_of_a_real_file_size_limit(tmp_path):
    """Not a stand-in: the kernel refuses the write (RLIMIT_FSIZE, errno EFBIG) of a 4 MB checkpoint."""
    target = tmp_path / 'last.pth'
    save_atomic({'step': 1}, target)
    code = ('import resource, signal, sys, torch; from hatnet.fileio import save_atomic; '
            'signal.signal(signal.SIGXFSZ, signal.SIG_IGN); '
            'resource.setrlimit(resource.RLIMIT_FSIZE, (100000, 100000)); '
            'save_atomic({"step": 2, "w": torch.zeros(1 << 20)}, sys.argv[1])')
    result = subprocess.run([sys.executable, '-c', code, str(target)], capture_output=True, text=True)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f'hatnet.errors.OutputError: cannot write {target}: File too large (') and 'free' in last
    assert torch.load(target, weights_only=True) == {'step': 1} and os.listdir(tmp_path) == ['last.pth']


def test_atomic_write_failing_before_its_temporary_file_names_the_target(tmp_path, monkeypatch):
    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    monkeypatch.setattr(tempfile, 'mkstemp', read_only)
    with pytest.raises(OutputError, match=f'cannot write {tmp_path}/x.png: Read-only file system'):
        atomic_write(tmp_path / 'x.png', lambda tmp: None)


# ---------------------------------------------------------------------------------------------- outputs
def test_outputs_never_replace_a_runs_files_and_others_only_when_asked(done_run, tmp_path):
    for name in ('curves.png', 'best.pth', 'metrics.csv', 'config.yaml', 'log.txt'):
        with pytest.raises(OutputError, match='is a file of the training run'):
            check_outputs([done_run / name], overwrite=True)
    check_outputs([done_run / 'cat_mask.png'])  # asked for: a new file may go into a run directory
    (tmp_path / 'pred.png').write_bytes(b'x')
    with pytest.raises(OutputError, match='exists already \\(pass --overwrite'):
        check_outputs([tmp_path / 'new.png', tmp_path / 'pred.png'])
    check_outputs([tmp_path / 'pred.png'], overwrite=True)
    with pytest.raises(OutputError, match='is a folder'):
        check_outputs([done_run])
