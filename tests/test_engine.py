"""The trainer on a toy task: optimisation, exact resume, DDP, schedules, run-directory rules."""
import csv
import dataclasses
import math
import os
import random
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from hatnet.engine import Task, TrainConfig, build_configs, distributed, load_run_checkpoint, resolve_config, train
from hatnet.engine.loaders import ResumableSampler, SeededDataset
from hatnet.errors import CheckpointError, DatasetError, HatNetError


@pytest.fixture(autouse=True)
def one_thread():
    # the toy model is tiny: one intra-op thread avoids thread hand-off costs on a busy machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass
class ToyConfig:
    n_train: int = 96
    n_val: int = 40
    crash_at: int = 0        # raise in this call of train_step (a simulated crash)
    step_sleep: float = 0.   # seconds per train_step (gives a test time to kill the process)
    dropout: float = 0.3
    noise: float = 0.3       # augmentation strength


class NoisyBlobs(Dataset):
    """Two Gaussian blobs in 8-D; 'augmentation' adds noise from torch's global generator."""

    def __init__(self, n: int, seed: int, noise: float):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.arange(n) % 2
        self.x = torch.randn(n, 8, generator=g) + 1.5 * (2 * self.y[:, None] - 1)
        self.noise = noise

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i] + self.noise * torch.randn(8), self.y[i]


class ToyTask(Task):
    name = 'toy'
    primary_metric = 'acc'

    def __init__(self, config: ToyConfig = None):
        self.config = config or ToyConfig()
        self.calls = 0

    def build_model(self):
        return nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Dropout(self.config.dropout), nn.LayerNorm(32),
                             nn.Linear(32, 2))

    def build_datasets(self):
        return NoisyBlobs(self.config.n_train, 1, self.config.noise), NoisyBlobs(self.config.n_val, 2, 0.)

    def train_step(self, model, batch, device):
        self.calls += 1
        if self.calls == self.config.crash_at:
            raise RuntimeError('simulated crash')
        time.sleep(self.config.step_sleep)
        x, y = (t.to(device) for t in batch)
        # like Mixup (numpy) and RandAugment (python): the trainer must seed and restore these generators too
        x = x * (1 + self.config.noise * (np.random.rand() - random.random()))
        logits = model(x)
        return F.cross_entropy(logits, y), {'acc': (logits.argmax(1) == y).float().mean()}

    def evaluate(self, model, loader, device):
        correct = total = loss = 0.
        for x, y in loader:
            logits = model(x.to(device)).float()
            correct += (logits.argmax(1) == y).sum().item()
            loss += F.cross_entropy(logits, y, reduction='sum').item()
            total += len(y)
        correct, loss, total = distributed.all_reduce_sum([correct, loss, total]).tolist()
        return {'acc': correct / total, 'loss': loss / total}

    def state(self):
        return {'classes': 2}


def _cfg(out, **kw):
    base = dict(out=str(out), iters=12, batch_size=8, lr=0.05, weight_decay=0.01, workers=0, eval_every=4,
                log_every=1, warmup_iters=2)
    if kw.get('epochs'):
        base['iters'] = 0
    base.update(kw)
    return TrainConfig(**base)


def _params(run_dir):
    return torch.load(Path(run_dir) / 'last.pth', weights_only=True)['model']


def _rows(run_dir):
    with open(Path(run_dir) / 'metrics.csv') as f:
        return [{k: v for k, v in row.items() if k != 'time_s'} for row in csv.DictReader(f)]


def test_training_lowers_loss_and_writes_the_run(tmp_path):
    result = train(ToyTask(), _cfg(tmp_path / 'run', iters=24, eval_every=8))
    rows = _rows(tmp_path / 'run')
    assert [int(r['step']) for r in rows] == [8, 16, 24]
    assert float(rows[-1]['val_loss']) < float(rows[0]['val_loss'])
    assert result['metrics']['val_acc'] > 0.9
    for name in ('config.yaml', 'last.pth', 'best.pth', 'metrics.csv', 'curves.png', 'log.txt'):
        assert (tmp_path / 'run' / name).is_file(), name
    best = load_run_checkpoint(tmp_path / 'run')
    assert best.task == 'toy' and best.task_state == {'classes': 2}
    assert best.metrics['val_acc'] == max(float(r['val_acc']) for r in rows)


@pytest.mark.parametrize('length, crash_at', [(dict(iters=14, eval_every=5), 10),
                                              (dict(epochs=3, accum_steps=2, workers=2), 19)])
def test_resume_after_crash_ends_where_an_uninterrupted_run_does(tmp_path, length, crash_at):
    # 12 batches per epoch; checkpoints every 4 steps and at evaluations; the crash is in step 10
    settings = dict(length, ema=True, save_every=4, clip_grad=1.0)
    train(ToyTask(), _cfg(tmp_path / 'full', **settings))
    np.random.seed(99), random.seed(99), torch.manual_seed(99)  # whatever ran before must not matter
    with pytest.raises(RuntimeError, match='simulated crash'):
        train(ToyTask(ToyConfig(crash_at=crash_at)), _cfg(tmp_path / 'crashed', **settings))
    last = torch.load(tmp_path / 'crashed' / 'last.pth', weights_only=True)
    assert last['step'] == 8 and last['batch_in_epoch'] > 0  # resumes in the middle of an epoch
    train(ToyTask(), _cfg(tmp_path / 'crashed', resume=True, **settings))

    full, resumed = _params(tmp_path / 'full'), _params(tmp_path / 'crashed')
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert _rows(tmp_path / 'full') == _rows(tmp_path / 'crashed')


class NoisySamples(Dataset):
    """Every sample is its index and a fresh random number: what an augmentation draws."""

    def __len__(self):
        return 6

    def __getitem__(self, index):
        return index, torch.rand(())


def test_persistent_workers_draw_each_epoch_as_the_main_process_does():
    data = SeededDataset(NoisySamples(), seed=3)

    def epochs(workers):
        sampler = ResumableSampler(data, num_replicas=1, rank=0, seed=3)
        loader = DataLoader(data, batch_size=2, sampler=sampler, num_workers=workers,
                            persistent_workers=workers > 0)
        draws = []
        for epoch in (0, 1, 0):
            sampler.set_epoch(epoch)
            draws.append({int(i): float(v) for indices, values in loader for i, v in zip(indices, values)})
        return draws

    in_worker, in_main = epochs(1), epochs(0)
    assert in_worker == in_main  # the workers, started once, follow the epoch the sampler hands them
    assert all(in_worker[0][i] != in_worker[1][i] for i in range(6)) and in_worker[2] == in_worker[0]


class SizedByDataTask(ToyTask):
    """A task whose model needs what only the data knows (the number of classes), with the default state()."""

    def build_datasets(self):
        self.class_names = ['negative', 'positive']
        return super().build_datasets()

    def build_model(self):
        return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, len(self.class_names)))

    state = Task.state


def test_datasets_are_built_before_the_model_and_the_state_has_one_schema(tmp_path):
    train(SizedByDataTask(), _cfg(tmp_path / 'run', iters=4))
    state = load_run_checkpoint(tmp_path / 'run').task_state
    assert state == dict(model=None, class_names=['negative', 'positive'], config=dataclasses.asdict(ToyConfig()))


def test_training_on_the_cpu_keeps_freed_memory_and_flushes_subnormals(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr('hatnet.engine.trainer.keep_freed_memory', lambda: calls.append('memory') or True)
    monkeypatch.setattr('hatnet.engine.trainer.flush_denormals', lambda: calls.append('subnormals') or True)
    train(ToyTask(), _cfg(tmp_path / 'run', iters=2, eval_every=2))
    assert sorted(calls) == ['memory', 'subnormals']


def test_bf16_autocast_trains(tmp_path):
    result = train(ToyTask(), _cfg(tmp_path / 'run', amp='bf16', channels_last=True, eval_every=12))
    assert result['metrics']['val_acc'] > 0.9 and result['metrics']['train_loss'] < 0.5


@pytest.mark.parametrize('emulated', [True, False])
def test_bf16_on_a_cpu_without_bf16_instructions_says_float32_is_faster(tmp_path, monkeypatch, emulated):
    monkeypatch.setattr('hatnet.engine.trainer.cpu_emulates_bf16', lambda: emulated)
    train(ToyTask(), _cfg(tmp_path / 'run', amp='bf16', iters=2, eval_every=2))
    log = (tmp_path / 'run' / 'log.txt').read_text()
    assert ('no bf16 instructions' in log) == emulated


def test_killed_process_resumes_exactly(tmp_path):
    """kill -9 a real training process in the middle of an epoch, resume it, compare with a clean run."""
    settings = dict(iters=16, eval_every=8, save_every=1)
    train(ToyTask(), _cfg(tmp_path / 'full', **settings))
    run = tmp_path / 'killed'
    code = ('import sys, torch; sys.path.insert(0, sys.argv[1]); torch.set_num_threads(1); '
            'from test_engine import ToyConfig, ToyTask, _cfg, train; '
            f'train(ToyTask(ToyConfig(step_sleep=0.1)), _cfg(sys.argv[2], **{settings!r}))')
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, '-c', code, str(Path(__file__).parent), str(run)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (run / 'last.pth').exists():
        time.sleep(0.05)
    time.sleep(0.35)  # a few more steps, so the kill lands between two checkpoints
    assert proc.poll() is None, 'the training process ended before it was killed'
    proc.kill()
    proc.wait()
    step = torch.load(run / 'last.pth', weights_only=True)['step']
    assert 0 < step < 16
    train(ToyTask(), _cfg(run, resume=True, **settings))
    full, resumed = _params(tmp_path / 'full'), _params(run)
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


# no dropout and no augmentation noise: the runs below differ only in how the work is split
_DETERMINISTIC = ToyConfig(n_val=41, dropout=0., noise=0.)


def _ddp_worker(rank, world_size, port, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR='127.0.0.1',
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    train(ToyTask(_DETERMINISTIC), _cfg(out, batch_size=8, iters=8, eval_every=4, ema=True, log_every=3))


def test_two_process_ddp_trains_like_one_process_with_the_global_batch(tmp_path):
    # fork: the processes start in a fraction of a second instead of importing everything again
    torch.multiprocessing.start_processes(_ddp_worker, args=(2, _free_port(), str(tmp_path / 'ddp')), nprocs=2,
                                          start_method='fork')
    train(ToyTask(_DETERMINISTIC), _cfg(tmp_path / 'single', batch_size=16, iters=8, eval_every=4, ema=True))

    # the two shards of each global batch are the single run's batch: averaged gradients give the same weights
    ddp, single = _params(tmp_path / 'ddp'), _params(tmp_path / 'single')
    assert all(torch.allclose(ddp[k], single[k], atol=1e-5) for k in single)
    ddp_rows, single_rows = _rows(tmp_path / 'ddp'), _rows(tmp_path / 'single')
    assert [r['step'] for r in ddp_rows] == ['4', '8']  # one row per evaluation, written once
    for d, s in zip(ddp_rows, single_rows):  # validation over both shards counts all 41 images once
        assert float(d['val_loss']) == pytest.approx(float(s['val_loss']), rel=1e-4)
        assert float(d['train_loss']) == pytest.approx(float(s['train_loss']), rel=1e-4)
        assert d['val_acc'] == s['val_acc']
    log = (tmp_path / 'ddp' / 'log.txt').read_text()
    assert log.count('best val_acc') == 1 and ' x 2,' in log  # rank 0 alone writes
    state = torch.load(tmp_path / 'ddp' / 'last.pth', weights_only=True)
    assert state['world_size'] == 2 and len(state['ranks']) == 2


def test_step_schedule_decays_at_the_milestones(tmp_path):
    train(ToyTask(ToyConfig(n_train=32)), _cfg(tmp_path / 'run', epochs=4, batch_size=8, sched='step',
                                               decay_milestones=[2, 3], decay_rate=0.1, warmup_iters=0, lr=0.01,
                                               eval_every=1))
    lrs = [float(r['lr']) for r in _rows(tmp_path / 'run')]  # the lr for the step after epochs 1..4
    assert lrs == pytest.approx([0.01, 0.001, 1e-4, 1e-4])


def test_poly_schedule_with_warmup_in_steps(tmp_path):
    train(ToyTask(), _cfg(tmp_path / 'run', iters=20, eval_every=5, sched='poly', poly_power=1.0, warmup_iters=5,
                          warmup_lr=0.0, lr=0.1))
    lrs = [float(r['lr']) for r in _rows(tmp_path / 'run')]
    assert lrs == pytest.approx([0.1 * (1 - s / 20) for s in (5, 10, 15, 20)])


def test_lr_is_scaled_with_the_global_batch(tmp_path):
    train(ToyTask(), _cfg(tmp_path / 'run', iters=4, sched='constant', warmup_iters=0, lr=0.1, lr_base_size=32,
                          batch_size=8, accum_steps=2))
    assert float(_rows(tmp_path / 'run')[0]['lr']) == pytest.approx(0.1 * 16 / 32)


def test_run_directory_rules(tmp_path):
    run = tmp_path / 'run'
    with pytest.raises(CheckpointError, match='cannot resume'):
        train(ToyTask(), _cfg(run, resume=True))
    train(ToyTask(), _cfg(run, iters=4))
    with pytest.raises(HatNetError, match='already exists'):
        train(ToyTask(), _cfg(run, iters=4))
    train(ToyTask(), _cfg(run, iters=8, overwrite=True))
    assert [r['step'] for r in _rows(run)] == ['4', '8']
    other = tmp_path / 'photos'
    other.mkdir()
    (other / 'holiday.jpg').write_bytes(b'x')
    with pytest.raises(HatNetError, match='not a hatnet run directory'):
        train(ToyTask(), _cfg(other, overwrite=True))
    assert (other / 'holiday.jpg').exists()
    (run / 'last.pth').unlink()
    with pytest.raises(CheckpointError, match='no checkpoint'):
        train(ToyTask(), _cfg(run, resume=True))


@pytest.mark.parametrize('settings, message', [
    (dict(epochs=2, iters=3), 'exactly one of epochs and iters'),
    (dict(amp='fp8'), 'amp must be'),
    (dict(sched='step'), 'decay_milestones'),
    (dict(sched='nonsense'), 'schedule'),
    (dict(batch_size=200), 'fewer than one optimiser step'),
])
def test_bad_settings_are_one_clear_error(tmp_path, settings, message):
    with pytest.raises(HatNetError, match=message):
        train(ToyTask(), _cfg(tmp_path / 'run', **settings))


def test_recipes_split_coerce_and_reject_unknown_keys(tmp_path):
    recipe = tmp_path / 'r.yaml'
    recipe.write_text('lr: 5e-4\nepochs: 12\nn_train: 50\ndecay_milestones: [8, 11]\nclip_grad: null\n')
    train_cfg, toy_cfg = resolve_config(ToyConfig, {'out': 'x', 'lr': None}, recipe=str(recipe))
    assert train_cfg.lr == 5e-4 and train_cfg.epochs == 12 and train_cfg.decay_milestones == [8, 11]
    assert toy_cfg.n_train == 50 and train_cfg.out == 'x'
    # a new length moves the lr steps to the same fractions of it (1x -> 2x schedule)
    train_cfg, _ = resolve_config(ToyConfig, {'epochs': 24}, recipe=str(recipe))
    assert (train_cfg.epochs, train_cfg.decay_milestones) == (24, [16, 22])
    train_cfg, _ = resolve_config(ToyConfig, {'iters': 300}, recipe=str(recipe))  # replaces the recipe's epochs
    assert (train_cfg.epochs, train_cfg.iters, train_cfg.decay_milestones) == (0, 300, [200, 275])
    recipe.write_text('lr: 1e-3\nlearning_rate: 3\n')
    with pytest.raises(HatNetError, match="unknown setting 'learning_rate'"):
        resolve_config(ToyConfig, {}, recipe=str(recipe))
    recipe.write_text('epochs: many\n')
    with pytest.raises(HatNetError, match="'epochs': expected int"):
        resolve_config(ToyConfig, {}, recipe=str(recipe))
    with pytest.raises(HatNetError, match='neither a file nor a bundled recipe'):
        resolve_config(ToyConfig, {}, recipe='no_such_recipe')


def test_renamed_settings_of_older_runs_are_read_under_their_new_name():
    from hatnet.tasks.classification import ClassificationConfig
    _, task_cfg = build_configs({'freeze_stages': 2, 'epochs': 1}, ClassificationConfig)
    assert task_cfg.frozen_stages == 2


def test_resume_reads_the_runs_own_config(tmp_path):
    run = tmp_path / 'run'
    train(ToyTask(ToyConfig(n_train=48)), _cfg(run, iters=4))
    train_cfg, toy_cfg = resolve_config(ToyConfig, {'out': str(run), 'resume': True, 'iters': 8, 'eval_every': 2})
    assert toy_cfg.n_train == 48 and train_cfg.iters == 8 and train_cfg.lr == 0.05 and train_cfg.resume
    train(ToyTask(toy_cfg), train_cfg)
    rows = _rows(run)
    assert [r['step'] for r in rows] == ['4', '6', '8']
    # the longer run follows the 8-step cosine (the 4-step one would be at its floor, 0, by now)
    assert float(rows[1]['lr']) == pytest.approx(0.05 * (1 + math.cos(math.pi * 6 / 8)) / 2)


def test_auto_choices_keep_the_users_options_and_are_written_with_their_reasons(tmp_path):
    from hatnet.engine.fitting import Choice, apply_choices
    cfg, task = _cfg(tmp_path / 'run', iters=24), ToyTask()
    choices = [Choice('lr', 0.1, 'small data'), Choice('warmup_iters', 4, 'short run'),
               Choice('noise', 0.1, 'task setting'), Choice('batch_size', 8, 'already so')]
    applied = apply_choices(cfg, task.config, choices, given={'lr', 'out'})
    # the user's lr stays, an unchanged value is not reported, a task setting reaches the task's config
    assert [c.key for c in applied] == ['warmup_iters', 'noise']
    assert (cfg.lr, cfg.warmup_iters, task.config.noise) == (0.05, 4, 0.1)
    with pytest.raises(KeyError):
        apply_choices(cfg, task.config, [Choice('no_such_setting', 1, '')], given=())

    train(task, cfg, applied)
    text = (tmp_path / 'run' / 'config.yaml').read_text()
    assert '# auto: warmup_iters = 4 (short run)' in text and '# auto: noise = 0.1 (task setting)' in text
    recipe = build_configs(__import__('yaml').safe_load(text), ToyConfig)  # still a recipe, comments aside
    assert recipe[0].warmup_iters == 4 and recipe[1].noise == 0.1
    log = (tmp_path / 'run' / 'log.txt').read_text()
    assert 'auto recipe: warmup_iters = 4  (short run)' in log


def test_machine_choices_leave_the_cpu_to_the_training_process():
    from hatnet.engine.fitting import cpu_count, machine_choices
    cfg = TrainConfig(workers=64)
    [choice] = machine_choices(cfg, torch.device('cpu'))
    assert choice.key == 'workers' and choice.value == cpu_count() - 1
    assert machine_choices(TrainConfig(workers=0), torch.device('cpu')) == []


def test_the_run_says_how_long_it_will_take_after_a_few_steps(tmp_path):
    task = ToyTask(ToyConfig(step_sleep=0.05))
    train(task, _cfg(tmp_path / 'run', iters=30, eval_every=10))
    log = (tmp_path / 'run' / 'log.txt').read_text()
    [line] = [l for l in log.splitlines() if 'measured' in l]
    per_step = float(line.split('measured ')[1].split(' s per step')[0])
    assert 0.05 <= per_step < 0.5  # the sleep dominates each step
    assert 'the remaining 24 steps take about' in line and 'plus 3 evaluation(s) on 40 images' in line


class BreaksOnce(Dataset):
    """A dataset whose ``reads``-th read fails while ``flag`` exists: a file that is broken (a truncated image
    passes the checks of the headers) until someone replaces it."""

    def __init__(self, dataset, reads: int, flag: Path):
        self.dataset, self.reads, self.flag, self.count = dataset, reads, flag, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        self.count += 1
        if self.count == self.reads and self.flag.exists():
            raise DatasetError(f'cannot read image {i}.jpg: image file is truncated')
        return self.dataset[i]


class BrokenFileTask(ToyTask):
    def __init__(self, flag: Path, split: int, reads: int):
        super().__init__()
        self.flag, self.split, self.reads = flag, split, reads

    def build_datasets(self):
        sets = list(super().build_datasets())
        sets[self.split] = BreaksOnce(sets[self.split], self.reads, self.flag)
        return tuple(sets)


# 96 training samples (12 steps of 8 an epoch), 40 validation ones, evaluations at steps 8, 16, 20
@pytest.mark.parametrize('split, reads', [(0, 100), (1, 1)], ids=['training image', 'validation image'])
def test_a_file_that_breaks_mid_run_keeps_the_work_done_and_resume_ends_as_if_nothing_broke(tmp_path, split, reads):
    settings = dict(iters=20, eval_every=8)
    train(ToyTask(), _cfg(tmp_path / 'full', **settings))
    flag = tmp_path / 'broken'
    flag.touch()
    with pytest.raises(DatasetError, match=r'truncated \(at step \d+; the run is saved'):
        train(BrokenFileTask(flag, split, reads), _cfg(tmp_path / 'run', **settings))
    saved = torch.load(tmp_path / 'run' / 'last.pth', weights_only=True)
    assert saved['step'] == (12 if split == 0 else 8)
    flag.unlink()  # the file is replaced
    train(ToyTask(), _cfg(tmp_path / 'run', resume=True, **settings))
    full, resumed = _params(tmp_path / 'full'), _params(tmp_path / 'run')
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert _rows(tmp_path / 'full') == _rows(tmp_path / 'run')


def test_the_fitting_reads_the_processes_torchrun_announces(monkeypatch):
    from hatnet.engine.fitting import launched_processes
    assert launched_processes() == launched_processes(local=True) == 1
    monkeypatch.setenv('WORLD_SIZE', '8')
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '4')  # two machines of four
    assert (launched_processes(), launched_processes(local=True)) == (8, 4)
