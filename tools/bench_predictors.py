"""How much faster a trained run predicts with ``amp='bf16'`` than in float32, and how much its results move.

For each run, two predictors (``hatnet.load(run, amp='none')`` and ``amp='bf16'``) predict the same generated
images (uniform noise of ``--size``; classification resizes them to its input size, segmentation to its test
scale or ``--short-side``, detection to its own sizes or ``--min-size`` / ``--max-size``) in interleaved rounds
after one untimed call each. Printed: the median time of each, their ratio, and how far the bf16 results are
from the float32 ones: top-1 agreement (classification), pixel agreement (segmentation), the number of
detections above the score threshold and the median of the largest coordinate difference between each float32
box and the bf16 box that overlaps it most (detection). On noise images the detections are low-scoring guesses;
a run's own evaluation (``hatnet det eval --amp bf16``) measures what the difference does to AP. Freed memory
is kept and subnormal floats are flushed, as the trainer and ``hatnet bench`` do.

    PYTHONPATH=src python tools/bench_predictors.py HAT-Net_Tiny.pth --size 256x256 --images 32
    PYTHONPATH=src python tools/bench_predictors.py runs/seg --size 512x683 --images 4 --short-side 512
    PYTHONPATH=src python tools/bench_predictors.py runs/retina --size 800x1200 --images 2 --min-size 800
"""
import argparse
import statistics
import time

import numpy as np
import torch
from torchvision.ops import box_iou

import hatnet
from hatnet.engine.checkpoint import load_run_checkpoint
from hatnet.models.runtime import flush_denormals, keep_freed_memory


def agreement(task: str, exact: list, fast: list) -> str:
    """How far the bf16 results are from the float32 ones, in the task's own terms."""
    if task == 'classification':
        return f'top-1 agreement {np.mean([a.indices[0] == b.indices[0] for a, b in zip(exact, fast)]):.3f}'
    if task == 'segmentation':
        return f'pixel agreement {np.mean([(a.mask == b.mask).mean() for a, b in zip(exact, fast)]):.4f}'
    counts = [f'{len(a.scores)}/{len(b.scores)}' for a, b in zip(exact, fast)]
    shifts = []  # of each float32 box's coordinates from its best-overlapping bf16 box (IoU > 0.5)
    for a, b in zip(exact, fast):
        if len(a.boxes) and len(b.boxes):
            best = box_iou(torch.from_numpy(a.boxes), torch.from_numpy(b.boxes)).max(1)
            matched = (best.values > 0.5).numpy()
            shifts += np.abs(a.boxes[matched] - b.boxes[best.indices.numpy()[matched]]).max(1).tolist()
    shift = f'{np.median(shifts):.2f} px' if shifts else '-'
    return f'detections float32/bf16 {" ".join(counts)}, median box shift of a match {shift}'


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('runs', nargs='+', help='Run directories or checkpoint files (any task).')
    parser.add_argument('--size', default='224x224', help='Generated images, HEIGHTxWIDTH.')
    parser.add_argument('--images', type=int, default=16, help='Images per predict call.')
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--short-side', type=int, help='Segmentation: the test scale (default: the run\'s).')
    parser.add_argument('--min-size', type=int, help='Detection: shorter side to resize to (default: the run\'s).')
    parser.add_argument('--max-size', type=int, help='Detection: cap on the longer side (default: the run\'s).')
    args = parser.parse_args()
    keep_freed_memory()
    flush_denormals()
    height, width = (int(v) for v in args.size.split('x'))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(args.images)]
    print(f'{torch.get_num_threads()} threads, {args.images} images of {height}x{width}, '
          f'median of {args.rounds} rounds')
    for run in args.runs:
        task = load_run_checkpoint(run).task or 'classification'  # a bare weights file is a classifier
        options = dict(classification={}, segmentation=dict(short_side=args.short_side),
                       detection=dict(min_size=args.min_size, max_size=args.max_size))[task]
        predictors = {amp: hatnet.load(run, device='cpu', amp=amp, **options) for amp in ('none', 'bf16')}
        results = {amp: p.predict(images) for amp, p in predictors.items()}  # untimed: first calls set up kernels
        seconds = {amp: [] for amp in predictors}
        for _ in range(args.rounds):
            for amp, predictor in predictors.items():
                start = time.perf_counter()
                predictor.predict(images)
                seconds[amp].append(time.perf_counter() - start)
        fp32, bf16 = (statistics.median(seconds[amp]) for amp in ('none', 'bf16'))
        print(f'{run} ({task}): float32 {fp32:.3f} s, bf16 {bf16:.3f} s, {fp32 / bf16:.2f}x; '
              f'{agreement(task, results["none"], results["bf16"])}', flush=True)


if __name__ == '__main__':
    main()
