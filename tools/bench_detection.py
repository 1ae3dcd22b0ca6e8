"""Seconds per training iteration of the COCO 1x detection recipes at 1333x800, on this machine.

Each recipe's detector (HAT-Net backbone) and the same detector on timm's ResNet-50 (the paper's baseline
backbone) run forward + backward + AdamW step on a synthetic batch of 1333x800 images with 10 boxes (and
masks) each, with the trainer's CPU settings (channels_last, fused AdamW, freed memory kept for the next step,
subnormal floats flushed to zero).
The models are timed interleaved, so a busy machine slows both alike, after untimed interleaved rounds that let
the heap settle (as ``hatnet bench`` does); the table gives the mean, the spread, the page faults of a timed
iteration (memory touched for the first time: the heap still growing) and the ratio to ResNet-50 in the same
memory layout, measured in the same run. ``--layouts channels_last nchw``
times every detector in both layouts.

    PYTHONPATH=src python tools/bench_detection.py [--batch-size 2] [--repeats 3] [--threads N]
        [--models hat_net_tiny resnet50] [--archs retinanet maskrcnn] [--layouts channels_last nchw]
"""
import argparse
import itertools
import statistics
import time
from functools import partial

import torch
from rich.console import Console
from rich.table import Table

from hatnet.bench import page_faults, settle_heap
from hatnet.engine import find_recipe, load_recipe
from hatnet.engine.trainer import fast_optimizer_kwargs
from hatnet.models.runtime import flush_denormals, keep_freed_memory
from hatnet.tasks.detection import DetectionConfig, build_detector

HEIGHT, WIDTH, BOXES, NUM_CLASSES = 800, 1333, 10, 81


def synthetic_batch(batch_size: int, with_masks: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(batch_size):
        xy = torch.rand(BOXES, 2, generator=g) * torch.tensor([WIDTH - 200, HEIGHT - 200])
        boxes = torch.cat([xy, xy + 40 + torch.rand(BOXES, 2, generator=g) * 150], dim=1)
        target = dict(boxes=boxes, labels=torch.randint(1, NUM_CLASSES, (BOXES,), generator=g))
        if with_masks:
            masks = torch.zeros(BOXES, HEIGHT, WIDTH, dtype=torch.uint8)
            for mask, (x1, y1, x2, y2) in zip(masks, boxes.int().tolist()):
                mask[y1:y2, x1:x2] = 1
            target['masks'] = masks
        images.append(torch.rand(3, HEIGHT, WIDTH, generator=g))
        targets.append(target)
    return images, targets


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--batch-size', type=int, default=2, help='images per iteration (the paper: 2 per GPU)')
    parser.add_argument('--repeats', type=int, default=3, help='timed iterations per model (after the untimed rounds)')
    parser.add_argument('--models', nargs='+', default=['hat_net_tiny', 'resnet50'], help='first: the one compared')
    parser.add_argument('--archs', nargs='+', default=['retinanet', 'maskrcnn'])
    parser.add_argument('--threads', type=int, default=0, help="intra-op threads (0: PyTorch's default)")
    parser.add_argument('--layouts', nargs='+', default=['channels_last'], choices=['channels_last', 'nchw'],
                        help="the models' memory format (channels_last: the trainer's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # as the trainer does on the CPU
    flush_denormals()

    runs = {}
    for arch in args.archs:
        recipe = load_recipe(find_recipe(f'coco_{arch}_1x'))
        config = DetectionConfig(arch=arch, drop_path_rate=recipe['drop_path_rate'])
        batch = synthetic_batch(args.batch_size, with_masks=arch == 'maskrcnn')
        for layout, name in itertools.product(args.layouts, args.models):
            model = build_detector(DetectionConfig(**{**vars(config), 'model': name}), NUM_CLASSES).train()
            if layout == 'channels_last':
                model.to(memory_format=torch.channels_last)
            optimizer = torch.optim.AdamW(model.parameters(), lr=recipe['lr'], weight_decay=recipe['weight_decay'],
                                          **fast_optimizer_kwargs(torch.device('cpu')))  # the trainer's fused AdamW
            runs[arch, layout, name] = dict(model=model, optimizer=optimizer, batch=batch, times=[], faults=[])

    def step(run):
        start = time.perf_counter()
        losses = run['model'](*run['batch'])
        run['optimizer'].zero_grad()
        sum(losses.values()).backward()
        run['optimizer'].step()
        return time.perf_counter() - start

    # untimed rounds first: oneDNN's kernel selection, and a heap that holds every model's iteration
    print(f'{settle_heap([partial(step, run) for run in runs.values()])} untimed round(s)', flush=True)
    for repeat in range(1, args.repeats + 1):
        for key, run in runs.items():
            faults = page_faults()
            run['times'].append(step(run))
            run['faults'].append(page_faults() - faults)
            print(f'{key[0]:>9} {key[1]:>13} {key[2]:>14} round {repeat}: {run["times"][-1]:.1f} s, '
                  f'{run["faults"][-1]} page faults', flush=True)

    table = Table(title=f'Training iteration at {WIDTH}x{HEIGHT}, batch {args.batch_size}, '
                        f'{torch.get_num_threads()} threads, fp32')
    for column in ('recipe', 'layout', 'backbone', 's / iteration', 'min - max', 'page faults',
                   f'ratio to {args.models[-1]}'):
        table.add_column(column, justify='left' if column in ('recipe', 'layout', 'backbone') else 'right')
    for (arch, layout, name), run in runs.items():
        mean = statistics.mean(run['times'])
        base = statistics.mean(runs[arch, layout, args.models[-1]]['times'])
        table.add_row(f'coco_{arch}_1x', layout, name, f'{mean:.1f}',
                      f'{min(run["times"]):.1f} - {max(run["times"]):.1f}', f'{statistics.median(run["faults"]):.0f}',
                      f'{mean / base:.2f}')
    Console(width=120).print(table)


if __name__ == '__main__':
    main()
