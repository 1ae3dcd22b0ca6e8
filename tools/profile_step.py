"""Where a training step (or an inference forward) of a backbone spends its time: its largest operators.

One step = forward, a loss, backward (no optimizer), fp32 or bf16 autocast, channels_last inputs, freed memory
kept for the next step and subnormal floats flushed to zero, as the trainer does. Classification at 224 x 224
(cross-entropy on the logits) by default; ``--features`` profiles the backbone as a dense-task feature extractor
(a mean-square loss on its stride-8/16/32 maps), e.g. at the detection size 800 x 1344. Two untimed steps come
first. ``--infer`` profiles an inference forward instead, as ``hatnet bench`` runs it (eval mode, inference mode,
HAT-Net in its CPU inference form ``optimize_for_cpu``).

``--timer ops`` times every ATen operator call with a clock around the call instead of torch.profiler (CPU
only, where kernels run synchronously). Under the profiler a step can run slower than without it, and the
extra time lands on a few memory-bound kernels (``silu_backward`` at several times its own time on 2-core
AMD CPUs, docs/performance.md); the clock around each call leaves the step within a few percent of its
unprofiled time.

    PYTHONPATH=src python tools/profile_step.py hat_net_tiny --size 800x1344 --batch-size 2 --features
    PYTHONPATH=src python tools/profile_step.py hat_net_small --dtype bf16 [--threads 2] [--rows 20]
    PYTHONPATH=src python tools/profile_step.py pvt_v2_b1 --timer ops
    PYTHONPATH=src python tools/profile_step.py hat_net_tiny --dtype bf16 --infer --timer ops
"""
import argparse
import time
from collections import Counter
from functools import partial

import timm
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

import hatnet.models  # noqa: F401  (registers the hat_net models with timm)
from hatnet.bench.runtimes import RunSettings, make_runner
from hatnet.models.runtime import flush_denormals, keep_freed_memory


class OperatorClock(TorchDispatchMode):
    """Seconds and calls of every ATen operator, by operator and by operator and shape of its first tensor."""

    def __init__(self):
        super().__init__()
        self.seconds = {'operator': Counter(), 'shape': Counter()}
        self.calls = {'operator': Counter(), 'shape': Counter()}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        elapsed = time.perf_counter() - start
        name = func.overloadpacket.__name__
        shape = next((tuple(a.shape) for a in args if isinstance(a, torch.Tensor)), ())
        for grouping, key in (('operator', name), ('shape', f'{name} {shape}')):
            self.seconds[grouping][key] += elapsed
            self.calls[grouping][key] += 1
        return out

    def table(self, grouping: str, rows: int) -> str:
        seconds, calls = self.seconds[grouping], self.calls[grouping]
        total = sum(seconds.values())
        title = 'operator' if grouping == 'operator' else 'operator (first input shape)'
        lines = [f'{title:<60} {"ms":>9} {"share":>6} {"calls":>6}']
        for key, value in seconds.most_common(rows):
            lines.append(f'{key:<60} {1e3 * value:9.1f} {value / total:6.1%} {calls[key]:6d}')
        return '\n'.join(lines + [f'{"all operators":<60} {1e3 * total:9.1f}'])


def dense_task_indices(model_name: str) -> tuple:
    """Indices of the model's stride-8, -16 and -32 feature maps (FPN inputs): (1, 2, 3) for HAT-Net and
    pvt_v2, (2, 3, 4) for ResNets, whose first map is at stride 2."""
    reductions = timm.create_model(model_name, features_only=True).feature_info.reduction()
    return tuple(index for index, reduction in enumerate(reductions) if reduction in (8, 16, 32))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('model', help='any timm model name')
    parser.add_argument('--size', default='224x224', help='HxW of the input')
    parser.add_argument('--batch-size', type=int, default=16)
    parser.add_argument('--dtype', choices=('fp32', 'bf16'), default='fp32')
    parser.add_argument('--features', action='store_true', help='features_only: the stride-8/16/32 maps')
    parser.add_argument('--infer', action='store_true', help='an inference forward instead of a training step')
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--rows', type=int, default=15, help='operators per table')
    parser.add_argument('--timer', choices=('profiler', 'ops'), default='profiler',
                        help='torch.profiler, or a clock around every operator call (CPU)')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    flush_denormals()
    height, width = (int(side) for side in args.size.split('x'))

    kwargs = dict(features_only=True, out_indices=dense_task_indices(args.model)) if args.features else {}
    model = timm.create_model(args.model, **kwargs).to(memory_format=torch.channels_last).train(not args.infer)
    images = torch.randn(args.batch_size, 3, height, width).to(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (args.batch_size,))

    def train_step() -> None:
        with torch.autocast('cpu', torch.bfloat16, enabled=args.dtype == 'bf16'):
            out = model(images)
            loss = sum(f.float().pow(2).mean() for f in out) if args.features else F.cross_entropy(out, labels)
        loss.backward()
        model.zero_grad(set_to_none=True)

    if args.infer:  # exactly as hatnet bench runs it: its eager runner
        run = make_runner(model, 'eager', RunSettings(torch.device('cpu'), dtype=args.dtype, channels_last=True))
        step = partial(run, images)
    else:
        step = train_step

    for _ in range(2):
        step()
    start = time.perf_counter()
    step()
    what = 'inference forward' if args.infer else 'step'
    print(f'{args.model}, {args.dtype}, batch {args.batch_size} at {height}x{width}, {args.threads} threads: '
          f'{time.perf_counter() - start:.3f} s per {what} (unprofiled)')
    if args.timer == 'ops':
        start = time.perf_counter()
        with OperatorClock() as clock:
            step()
        print(f'{time.perf_counter() - start:.3f} s for the {what} timed operator by operator\n')
        print(clock.table('operator', args.rows) + '\n')
        print(clock.table('shape', args.rows))
        return
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    print(prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=args.rows, max_name_column_width=45))
    print(prof.key_averages(group_by_input_shape=True).table(
        sort_by='self_cpu_time_total', row_limit=args.rows, max_name_column_width=45, max_shapes_column_width=100))


if __name__ == '__main__':
    main()
