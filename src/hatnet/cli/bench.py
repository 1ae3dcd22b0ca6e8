"""``hatnet bench``."""
from pathlib import Path
from typing import Optional

import typer

from ..engine.run_dir import check_output_folder, check_outputs
from ..errors import HatNetError
from ..extras import require
from .app import app, console as output_console
from .options import comma_list

OUTPUTS = ('bench.csv', 'throughput.png', 'memory.png')


def _device(name: str):
    import torch
    if name not in ('auto', 'cpu', 'cuda'):
        raise HatNetError(f'--device must be auto, cpu or cuda, not {name!r}')
    if name == 'cuda' and not torch.cuda.is_available():
        raise HatNetError('--device cuda: no CUDA device is available')
    return torch.device('cuda' if name == 'auto' and torch.cuda.is_available() else 'cpu' if name == 'auto' else name)


@app.command()
def bench(
        models: Optional[str] = typer.Option(
            None, help='Comma-separated timm names; NAME-global is a hat_net model with plain global self-attention in '
                       'every stage (the ablation). Default: hat_net_tiny, hat_net_small, pvt_v2_b1, pvt_v2_b2, '
                       'swin_tiny_patch4_window7_224, convnext_tiny, resnet50, hat_net_tiny-global.'),
        resolutions: str = typer.Option('224,320,448,480x640,640,800,1024',
                                        help='Comma-separated sizes: SIDE or HEIGHTxWIDTH.'),
        runtime: str = typer.Option('eager', help='Comma-separated runtimes: eager, compile, onnxruntime.'),
        baseline: Optional[str] = typer.Option(None, help='Model the ratios refer to, in the same runtime, dtype and '
                                                          'mode (default: the first model), e.g. pvt_v2_b1; or one '
                                                          'row, e.g. "pvt_v2_b1 (onnxruntime)".'),
        compare: Optional[str] = typer.Option(None, help='Comma-separated MODEL/PEER pairs, e.g. '
                                                         'hat_net_tiny/pvt_v2_b1: a table of their img/s ratio in every '
                                                         'setting.'),
        batch_size: int = typer.Option(16, help='Images per batch at 224x224.'),
        scale_batch: bool = typer.Option(True, help='Shrink the batch at larger sizes to keep pixels per batch constant.'),
        rounds: int = typer.Option(5, help='Timed runs per model and size (interleaved); the median is reported.'),
        warmup: int = typer.Option(1, help='Untimed runs per model and size before the timed ones.'),
        latency: bool = typer.Option(True, help='Also time batch-1 calls.'),
        max_seconds: float = typer.Option(60., help='Stop running a model at larger sizes once a batch takes longer.'),
        threads: Optional[int] = typer.Option(None, help='CPU threads (torch and onnxruntime); default: torch default.'),
        dtype: str = typer.Option('fp32', help='Comma-separated: fp32, bf16 (autocast); every model runs in each.'),
        mode: str = typer.Option('infer', help='Comma-separated: infer, train (one call = forward, loss, backward '
                                                'and AdamW step); every model runs in each.'),
        features: bool = typer.Option(False, help='Time the backbones as detection / segmentation feature extractors '
                                                  '(features_only, strides 4-32), e.g. at 800x1333 and 512.'),
        channels_last: bool = typer.Option(True, help='Convert every model and the inputs to channels_last (hat_net '
                                                      'runs channels_last inside whatever its input, so this is the '
                                                      'fair comparison); --no-channels-last keeps the peers NCHW.'),
        keep_memory: Optional[bool] = typer.Option(
            None, '--keep-memory/--no-keep-memory',
            help='CPU: keep freed memory in the process (glibc mallopt), as the trainer does, instead of '
                 'page-faulting every large activation in anew on each pass, which slows the models with the '
                 'largest activations most. Default: on wherever glibc offers it.'),
        device: str = typer.Option('auto', help='auto, cpu or cuda.'),
        out: Path = typer.Option(Path('bench-results'), help='Folder for bench.csv, throughput.png and memory.png.'),
        overwrite: bool = typer.Option(False, help='Replace those files in --out if they exist.'),
):
    """Throughput, batch-1 latency, peak memory and GMACs of HAT-Net and timm peers, measured side by side."""
    require('matplotlib', *(('onnxruntime', 'onnx') if 'onnxruntime' in runtime else ()))
    import torch

    from ..bench import (DEFAULT_MODELS, DTYPES, MODES, RUNTIMES, BenchConfig, RunSettings, compare_table,
                         describe_machine, keep_freed_memory, load_average, parse_pair, parse_resolution, plot,
                         run_bench, table, timm_name, write_csv)
    from ..models.runtime import EMULATED_BF16_NOTE, cpu_emulates_bf16

    runtimes = comma_list(runtime)
    for name in runtimes:
        if name not in RUNTIMES:
            raise HatNetError(f'unknown runtime {name!r}, choose from {", ".join(RUNTIMES)}')
    dtypes, modes = comma_list(dtype), comma_list(mode)
    for name in dtypes:
        if name not in DTYPES:
            raise HatNetError(f'--dtype must be one of {", ".join(DTYPES)}, not {name!r}')
    for name in modes:
        if name not in MODES:
            raise HatNetError(f'--mode must be one of {", ".join(MODES)}, not {name!r}')
    if not dtypes or not modes:
        raise HatNetError('--dtype and --mode need at least one value')
    if batch_size < 1 or rounds < 1 or warmup < 1 or (threads is not None and threads < 1):
        raise HatNetError('--batch-size, --rounds, --warmup and --threads must be at least 1')
    settings = RunSettings(_device(device), dtype=dtypes[0], channels_last=channels_last, threads=threads,
                           mode=modes[0])
    model_names = comma_list(models) if models is not None else list(DEFAULT_MODELS)
    if not model_names:
        raise HatNetError('--models is empty')
    for name in model_names:
        timm_name(name)
    pairs = [parse_pair(text, model_names) for text in comma_list(compare or '')]
    outputs = [out / name for name in OUTPUTS]
    check_output_folder(out)  # the outputs, before the benchmark runs
    check_outputs(outputs, overwrite)
    config = BenchConfig(
        models=model_names, resolutions=[parse_resolution(r) for r in comma_list(resolutions)], runtimes=runtimes,
        settings=settings, dtypes=dtypes, modes=modes, features=features, batch_size=batch_size,
        scale_batch=scale_batch, rounds=rounds, warmup=warmup, latency=latency, max_forward_seconds=max_seconds,
        baseline=baseline)

    kept_memory = keep_memory is not False and keep_freed_memory()  # None: wherever glibc offers it
    if keep_memory and not kept_memory:
        raise HatNetError('--keep-memory needs glibc (Linux)')
    console = output_console()
    if not console.is_terminal:
        console = output_console(width=200)  # a log file gets the whole table
    if 'bf16' in dtypes and settings.device.type == 'cpu' and cpu_emulates_bf16():
        console.print(f'note: {EMULATED_BF16_NOTE}; its bf16 rows take that much longer to run', highlight=False)
    load_before = load_average()
    if console.is_terminal:
        with console.status('benchmarking') as status:
            rows = run_bench(config, progress=status.update)
    else:  # a log file gets one line per step
        rows = run_bench(config, progress=lambda message: console.print(message, highlight=False))
    load_after = load_average()
    conditions = dict(
        machine=describe_machine(settings.device), device=settings.device.type,
        threads=settings.threads or torch.get_num_threads(), channels_last=channels_last, features=features,
        keep_memory=kept_memory,
        torch=torch.__version__, load_before=f'{load_before[0]:.2f}', load_after=f'{load_after[0]:.2f}')
    base = baseline or model_names[0]
    csv_path, throughput_png, memory_png = outputs
    write_csv(rows, csv_path, conditions)
    settings_text = ', '.join(f'{k} {v}' for k, v in conditions.items() if k not in ('machine', 'torch'))
    subtitle = f'{conditions["machine"]}; {settings_text}; median of {rounds} interleaved runs'
    plot(rows, throughput_png, 'img_per_s', 'images / s', f'Throughput vs input size\n{subtitle}')
    plot(rows, memory_png, 'peak_memory_mb', 'peak memory above idle (MiB)',
         f'Peak memory of one batch vs input size\n{subtitle}')
    console.print(table(rows, base, f'hatnet bench: {subtitle}\ntorch {torch.__version__}'))
    if pairs:
        console.print(compare_table(rows, pairs))
    console.print(f'wrote {", ".join(map(str, outputs))}')
