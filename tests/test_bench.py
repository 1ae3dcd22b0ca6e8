"""hatnet bench: interleaved measurements, ratios, skip rules, outputs, and the runtimes it drives."""
import csv
import math
import os
import subprocess
import sys
import time
from unittest import mock

import pytest
import torch
from typer.testing import CliRunner

from hatnet.bench import (BenchConfig, RunSettings, build_model, make_runner, parse_resolution, peak_memory_mb,
                          run_bench)
from hatnet.bench.measure import describe_machine, page_faults
from hatnet.bench.runner import SETTLE_MAX_ROUNDS, batch_for, settle_heap
from hatnet.cli import app, main
from hatnet.errors import HatNetError
from hatnet.models.runtime import IS_X86
from hatnet.reference import reference_model

CPU = RunSettings(torch.device('cpu'), threads=1)


def test_parse_resolution():
    assert parse_resolution('224') == (224, 224)
    assert parse_resolution('480x640') == (480, 640)
    for bad in ('16', 'axb', '1x2x3', ''):
        with pytest.raises(HatNetError, match='bad resolution'):
            parse_resolution(bad)


def test_batch_keeps_pixels_per_batch():
    config = BenchConfig(batch_size=16)
    assert batch_for(config, 224, 224) == 16
    assert batch_for(config, 448, 448) == 4
    assert batch_for(config, 1024, 1024) == 1
    assert batch_for(BenchConfig(batch_size=16, scale_batch=False), 448, 448) == 16


def test_global_ablation_is_plain_attention_everywhere():
    model = build_model('hat_net_tiny-global')
    assert all(block.attn.grid_size == 1 for stage in model.stages for block in stage.blocks)
    with pytest.raises(HatNetError, match='hat_net models only'):
        build_model('resnet50-global')


def test_run_bench_rows_and_ratios(monkeypatch):
    monkeypatch.delenv('ONEDNN_PRIMITIVE_CACHE_CAPACITY', raising=False)
    config = BenchConfig(models=['hat_net_tiny', 'hat_net_tiny-global'], resolutions=[(96, 128), (64, 64)],
                         settings=CPU, batch_size=1, rounds=2, baseline='hat_net_tiny-global')
    rows = run_bench(config)
    assert [(r.model, r.height) for r in rows] == [
        ('hat_net_tiny', 64), ('hat_net_tiny-global', 64), ('hat_net_tiny', 96), ('hat_net_tiny-global', 96)]
    for row in rows:
        assert row.status == 'ok'
        assert row.img_per_s > 0 and row.latency_ms > 0 and row.peak_memory_mb > 0 and row.gmacs > 0
        assert row.ratio == pytest.approx(row.img_per_s / next(
            r.img_per_s for r in rows if r.model == 'hat_net_tiny-global' and r.height == row.height))
    assert rows[0].batch == round(224 * 224 / (64 * 64)) and rows[2].batch == round(224 * 224 / (96 * 128))
    # the MACs of global attention grow faster with the input size than those of H-MHSA
    assert rows[3].gmacs / rows[1].gmacs > rows[2].gmacs / rows[0].gmacs
    assert int(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY']) > 1024  # for a process that starts with the bench


_KERNEL_CYCLE = """
import sys, torch, torch.nn.functional as F
from hatnet.models.runtime import keep_compiled_kernels
if sys.argv[1] == 'keep':
    keep_compiled_kernels()
x = torch.randn(16, 8, 4, 4).contiguous(memory_format=torch.channels_last)  # (PyTorch calls oneDNN from batch 16)
# 1 200 distinct oneDNN kernels: each convolution's own and the reorder of its weights
weights = [torch.randn(channels, 8, 1, 1) for channels in range(1, 601)]
for _ in range(3):  # as a bench's rounds: every kernel once per round
    for weight in weights:
        F.conv2d(x, weight)
"""


def _kernels_compiled(mode: str) -> int:
    env = dict(os.environ, ONEDNN_VERBOSE='profile_create')
    env.pop('ONEDNN_PRIMITIVE_CACHE_CAPACITY', None)
    result = subprocess.run([sys.executable, '-c', _KERNEL_CYCLE, mode], env=env, capture_output=True, text=True,
                            check=True)
    return result.stdout.count('create:cache_miss')


@pytest.mark.skipif(not IS_X86, reason="counts x86 oneDNN's kernels")
def test_kernels_of_many_models_stay_compiled_across_rounds():
    """oneDNN's default cache holds 1 024 kernels: cycling through more recompiles every one of them in every
    round; with ``keep_compiled_kernels`` (which ``run_bench`` calls) each is compiled once."""
    kept, default = _kernels_compiled('keep'), _kernels_compiled('default')
    assert kept >= 1200  # oneDNN really ran (and logged) the convolutions
    assert default > 2.5 * kept


def test_too_slow_models_are_skipped_at_larger_sizes():
    config = BenchConfig(models=['hat_net_tiny'], resolutions=[(64, 64), (96, 96)], settings=CPU, batch_size=1,
                         rounds=1, latency=False, max_forward_seconds=0.)
    rows = run_bench(config)
    assert [r.status.startswith('too slow') for r in rows] == [True, True]


def test_compile_time_is_reported_and_not_judged_as_speed(monkeypatch):
    """The first torch.compile call compiles for minutes: its time is the compile_s column, not 'too slow'."""
    compile_seconds = 0.5

    def slow_first_call(model, **kwargs):
        calls = []

        def run(images):
            if not calls:
                time.sleep(compile_seconds)
            calls.append(1)
            return model(images)
        return run

    monkeypatch.setattr('hatnet.bench.runtimes.compile_model', slow_first_call)
    config = BenchConfig(models=['hat_net_tiny'], runtimes=['compile'], resolutions=[(64, 64)], settings=CPU,
                         batch_size=1, rounds=1, latency=False, max_forward_seconds=0.4)
    row, = run_bench(config)
    assert row.status == 'ok' and row.compile_s >= compile_seconds and row.img_per_s > 1 / 0.4


def test_untimed_rounds_run_until_the_heap_stops_growing(monkeypatch):
    state = {'faults': 0, 'calls': 0}
    monkeypatch.setattr('hatnet.bench.runner.page_faults', lambda: state['faults'])

    def call():  # the first four calls grow the heap
        state['calls'] += 1
        if state['calls'] <= 4:
            state['faults'] += 10_000

    assert settle_heap([call, call]) == 3 and state['calls'] == 6  # two growing rounds, one quiet one
    state['calls'] = -1_000  # a heap that keeps growing: the rounds stop at the cap
    assert settle_heap([call]) == SETTLE_MAX_ROUNDS


@pytest.mark.skipif(sys.platform == 'win32', reason='no page-fault counts on Windows')
def test_page_faults_count_memory_touched_for_the_first_time():
    import mmap
    size = 64 * 2 ** 20
    memory = mmap.mmap(-1, size)
    before = page_faults()
    for offset in range(0, size, 4096):
        memory[offset] = 1
    assert page_faults() - before >= size // (2 * 2 ** 20)  # at least one per page, even with 2 MiB pages
    memory.close()


def test_peak_memory_sees_an_allocation():
    assert peak_memory_mb(lambda: torch.ones(25_000_000).sum(), torch.device('cpu')) > 80


def test_bf16_autocast_costs_little_accuracy():
    model = reference_model('tiny', weight_seed=0)
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        fp32 = model(images)
    bf16 = make_runner(model, 'eager', RunSettings(torch.device('cpu'), dtype='bf16'))(images)
    assert bf16.dtype == torch.bfloat16
    error = (bf16.float() - fp32).abs().max().item()
    assert 0 < error < 0.05 * fp32.abs().max().item()


def test_onnxruntime_is_fp32_cpu_only():
    with pytest.raises(HatNetError, match='fp32'):
        make_runner(build_model('hat_net_tiny'), 'onnxruntime', RunSettings(torch.device('cpu'), dtype='bf16'))


def test_bench_cli_writes_csv_plots_and_table(tmp_path):
    result = CliRunner().invoke(app, [
        'bench', '--models', 'hat_net_tiny,hat_net_tiny-global', '--resolutions', '64,64x96', '--batch-size', '1',
        '--no-scale-batch', '--rounds', '1', '--no-latency', '--threads', '1', '--out', str(tmp_path)])
    assert result.exit_code == 0, result.output
    with open(tmp_path / 'bench.csv') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {r['threads'] for r in rows} == {'1'} and {r['dtype'] for r in rows} == {'fp32'}
    assert float(rows[0]['ratio']) == 1.0 and float(rows[1]['ratio']) > 0
    assert all(float(r['page_faults']) >= 0 for r in rows)
    for name in ('throughput.png', 'memory.png'):
        assert (tmp_path / name).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert 'hat_net_tiny-global' in result.output and 'AVX' in result.output or 'CPU' in result.output


@pytest.mark.parametrize('args, message', [
    (['--runtime', 'tensorrt'], 'unknown runtime'),
    (['--baseline', 'resnet50'], 'baseline'),
    (['--dtype', 'fp16'], '--dtype'),
    (['--mode', 'eval'], '--mode'),
    (['--compare', 'hat_net_tiny/resnet50'], 'bad pair'),
    (['--resolutions', '20'], 'bad resolution'),
])
def test_bench_cli_bad_options_are_one_line(tmp_path, args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(['bench', '--models', 'hat_net_tiny', '--resolutions', '64', '--out', str(tmp_path), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and 'Traceback' not in err


def test_train_mode_runs_whole_training_steps():
    model = build_model('hat_net_tiny')
    before = [p.detach().clone() for p in model.parameters()]
    step = make_runner(model, 'eager', RunSettings(torch.device('cpu'), mode='train', channels_last=True))
    loss = step(torch.randn(2, 3, 64, 64))
    assert model.training and loss.dim() == 0 and torch.isfinite(loss)
    # backward reached every weight, and the optimizer stepped every weight with a gradient
    assert all(p.grad is not None for p in model.parameters())
    moved = [not torch.equal(a, p) for a, p in zip(before, model.parameters()) if p.grad.count_nonzero()]
    assert len(moved) > 100 and all(moved)
    with pytest.raises(HatNetError, match='inference only'):
        make_runner(build_model('hat_net_tiny'), 'onnxruntime', RunSettings(torch.device('cpu'), mode='train'))


def test_feature_backbones_train_on_every_stage():
    model = build_model('resnet18', features=True)
    step = make_runner(model, 'eager', RunSettings(torch.device('cpu'), mode='train'))
    step(torch.randn(2, 3, 64, 64))
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    with torch.inference_mode():
        features = make_runner(build_model('hat_net_tiny', features=True), 'eager', CPU)(torch.randn(1, 3, 64, 64))
    assert [f.shape[-1] for f in features] == [16, 8, 4, 2]


def test_channels_last_is_applied_to_every_model():
    model = build_model('resnet18')
    run = make_runner(model, 'eager', RunSettings(torch.device('cpu'), channels_last=True))
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert not model.conv1.weight.is_contiguous()
    assert run(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_run_bench_every_dtype_and_mode_with_ratios_per_setting():
    config = BenchConfig(models=['hat_net_tiny', 'resnet18'], resolutions=[(32, 32)], runtimes=['eager'],
                         settings=CPU, dtypes=['fp32', 'bf16'], modes=['infer', 'train'], batch_size=2,
                         scale_batch=False, rounds=1, baseline='resnet18')
    rows = run_bench(config)
    assert [r.label for r in rows] == [
        'hat_net_tiny', 'resnet18', 'hat_net_tiny (bf16)', 'resnet18 (bf16)',
        'hat_net_tiny (train)', 'resnet18 (train)', 'hat_net_tiny (bf16, train)', 'resnet18 (bf16, train)']
    assert all(r.status == 'ok' and r.img_per_s > 0 for r in rows)
    for hat, peer in zip(rows[::2], rows[1::2]):  # each ratio refers to the baseline in the same setting
        assert peer.ratio == 1.0 and hat.ratio == pytest.approx(hat.img_per_s / peer.img_per_s)
    assert all(math.isnan(r.latency_ms) and math.isnan(r.max_abs_diff) for r in rows[4:])  # train: no latency
    assert rows[2].max_abs_diff > 0 and math.isnan(rows[0].max_abs_diff)


def test_onnxruntime_rows_only_for_fp32_inference(tmp_path):
    from hatnet.bench.runner import _candidates
    config = BenchConfig(models=['hat_net_tiny'], runtimes=['eager', 'onnxruntime'], settings=CPU,
                         dtypes=['fp32', 'bf16'], modes=['infer', 'train'])
    assert [c.label for c in _candidates(config, tmp_path)] == [
        'hat_net_tiny', 'hat_net_tiny (onnxruntime)', 'hat_net_tiny (bf16)', 'hat_net_tiny (train)',
        'hat_net_tiny (bf16, train)']


def test_bench_cli_train_mode_and_compare_table(tmp_path):
    result = CliRunner().invoke(app, [
        'bench', '--models', 'hat_net_tiny,resnet18', '--resolutions', '64', '--batch-size', '1',
        '--no-scale-batch', '--rounds', '1', '--mode', 'infer,train', '--compare', 'hat_net_tiny/resnet18',
        '--threads', '1', '--out', str(tmp_path)])
    assert result.exit_code == 0, result.output
    with open(tmp_path / 'bench.csv') as f:
        rows = list(csv.DictReader(f))
    assert [(r['model'], r['mode']) for r in rows] == [
        ('hat_net_tiny', 'infer'), ('resnet18', 'infer'), ('hat_net_tiny', 'train'), ('resnet18', 'train')]
    assert {r['channels_last'] for r in rows} == {'True'}  # the default: every model channels_last
    assert 'hat_net_tiny / resnet18' in result.output and 'eager, fp32, train' in result.output


@pytest.mark.parametrize('flag, glibc, kept', [
    ([], True, True),  # the default: freed memory stays in the process, as in the trainer
    ([], False, False),  # ... where glibc offers it, without complaint elsewhere
    (['--no-keep-memory'], True, False),
    (['--keep-memory'], True, True),
])
def test_bench_cli_keeps_freed_memory_by_default(tmp_path, monkeypatch, flag, glibc, kept):
    calls = []
    monkeypatch.setattr('hatnet.bench.keep_freed_memory', lambda: calls.append(1) or glibc)
    result = CliRunner().invoke(app, [
        'bench', '--models', 'hat_net_tiny', '--resolutions', '64', '--batch-size', '1', '--no-scale-batch',
        '--rounds', '1', '--no-latency', '--threads', '1', '--out', str(tmp_path), *flag])
    assert result.exit_code == 0, result.output
    with open(tmp_path / 'bench.csv') as f:
        assert [r['keep_memory'] for r in csv.DictReader(f)] == [str(kept)]
    assert len(calls) == (flag != ['--no-keep-memory'])


def test_bench_cli_keep_memory_without_glibc_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr('hatnet.bench.keep_freed_memory', lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        main(['bench', '--models', 'hat_net_tiny', '--resolutions', '64', '--out', str(tmp_path), '--keep-memory'])
    assert exit_info.value.code == 2
    assert '--keep-memory needs glibc' in capsys.readouterr().err
    assert not (tmp_path / 'bench.csv').exists()


@pytest.mark.parametrize('emulated', [True, False])
def test_bench_cli_says_when_bf16_rows_run_in_software(tmp_path, monkeypatch, emulated):
    monkeypatch.setattr('hatnet.models.runtime.cpu_emulates_bf16', lambda: emulated)
    result = CliRunner().invoke(app, [
        'bench', '--models', 'hat_net_tiny', '--resolutions', '64', '--batch-size', '1', '--no-scale-batch',
        '--rounds', '1', '--dtype', 'bf16', '--no-latency', '--threads', '1', '--out', str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert ('no bf16 instructions (AVX-512-BF16, AMX): bf16 autocast runs in software' in result.output) == emulated


@pytest.mark.parametrize('flags, expected', [
    ('fpu avx2 avx512f avx512_vnni', 'AVX-512, no bf16 instructions'),
    ('fpu avx2 avx512f avx512_bf16', 'AVX-512 (avx512_bf16)'),
    ('fpu avx2 amx_bf16', 'AVX2 (amx_bf16)'),
])
def test_the_report_says_whether_the_cpu_has_bf16_instructions(flags, expected, monkeypatch):
    # the verdict is the trainer's (torch's CPU detection), the flags name what the CPU has
    monkeypatch.setattr('hatnet.bench.measure.cpu_emulates_bf16', lambda: 'bf16' not in flags)
    cpuinfo = f'model name\t: Some CPU\nflags\t\t: {flags}\n'
    with mock.patch('builtins.open', mock.mock_open(read_data=cpuinfo)):
        assert describe_machine(torch.device('cpu')).endswith(expected)
