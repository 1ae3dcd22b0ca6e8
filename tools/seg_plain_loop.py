"""Semantic FPN or the U-Net decoder on a segmentation folder, trained by a plain loop with a chosen augmentation.

Tells apart what limits learning on a dataset: the trainer's recipe and augmentation, or the data itself.
It uses hatnet's dataset, model and metrics, but its own loop: AdamW (weight decay 0.01), linear warm-up over
30 steps, cosine decay, gradient norm clipped at 1, batch 8, crops of 128 px, one thread; the head is
``--head`` (``fpn`` or ``unet``) with the norm ``--norm`` (BatchNorm or GroupNorm). Every ``--every`` steps it
prints the mean training loss of the last 50 steps, the validation mIoU with the IoU of each class, and the
mIoU on the first 60 training images (at the validation scale): a model that memorises its training images
scores far higher there.

    PYTHONPATH=src python tools/seg_plain_loop.py DATA --model hat_net_tiny --head unet --augment none --steps 600

--augment none: random 128 px crops (padded where the image is smaller) only; flip: and a horizontal flip;
full: the recipes' training pipeline (scales ``--scales`` x 128 px, 0.75-1.5 by default as the auto recipe with
ImageNet weights, 1 1 as from scratch; cat-max-ratio crop, flip, photometric distortion).
"""
import argparse
import math
import time
from typing import Tuple

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import tv_tensors
from torchvision.transforms import v2

from hatnet.data.segmentation import (SegmentationDataset, _normalize, collate, eval_transform, load_data,
                                     train_transform)
from hatnet.tasks.segmentation import HEADS, build_segmenter, confusion_matrix, segmentation_metrics

CROP, BATCH, WARMUP = 128, 8, 30


def training_transform(augment: str, scales: Tuple[float, float], ignore_index: int) -> v2.Compose:
    mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    if augment == 'full':
        return train_transform(CROP, CROP, mean, std, scales, 0.75, ignore_index)
    crop = v2.RandomCrop(CROP, pad_if_needed=True,
                         fill={tv_tensors.Image: round(255 * mean[0]), tv_tensors.Mask: ignore_index})
    flip = [v2.RandomHorizontalFlip()] if augment == 'flip' else []
    return v2.Compose([crop, *flip, *_normalize(mean, std)])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('data')
    parser.add_argument('--model', default='hat_net_tiny')
    parser.add_argument('--augment', choices=('none', 'flip', 'full'), default='none')
    parser.add_argument('--scales', type=float, nargs=2, default=(0.75, 1.5), metavar=('LOW', 'HIGH'),
                        help='--augment full: training scales (the auto recipe: 1 1 from scratch)')
    parser.add_argument('--head', choices=tuple(HEADS), default='fpn')
    parser.add_argument('--norm', choices=('bn', 'gn'), default='bn')
    parser.add_argument('--lr', type=float, default=1e-3)
    parser.add_argument('--steps', type=int, default=600)
    parser.add_argument('--every', type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)

    data = load_data(args.data, 'folders')
    augment = training_transform(args.augment, tuple(args.scales), data.ignore_index)
    train = SegmentationDataset(data.samples['train'], augment, data.ignore_index, data.reduce_zero_label)
    scale = eval_transform(CROP, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    val, seen = (SegmentationDataset(samples, scale, data.ignore_index, data.reduce_zero_label, joint=False)
                 for samples in (data.samples['val'], data.samples['train'][:60]))
    train_loader = torch.utils.data.DataLoader(train, BATCH, shuffle=True, collate_fn=collate, drop_last=True)
    val_loader, seen_loader = (torch.utils.data.DataLoader(d, BATCH, collate_fn=collate) for d in (val, seen))

    model = build_segmenter(args.head, args.model, data.num_classes, norm=args.norm,
                            drop_path_rate=0.0 if args.model.startswith('hat_net') else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1, (step + 1) / WARMUP) * 0.5 * (1 + math.cos(math.pi * step / args.steps)))

    def metrics(loader):
        model.eval()
        return segmentation_metrics(confusion_matrix(model, loader, torch.device('cpu'), data.num_classes,
                                                     data.ignore_index, 0, False))

    step, losses, start = 0, [], time.time()
    while step < args.steps:
        for images, masks in train_loader:
            model.train()
            loss = F.cross_entropy(model(torch.stack(images)), torch.stack(masks), ignore_index=data.ignore_index)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            step += 1
            if step % args.every == 0 or step == args.steps:
                on_val, on_seen = metrics(val_loader), metrics(seen_loader)
                print(f'step {step}  train loss {sum(losses[-50:]) / len(losses[-50:]):.3f}  '
                      f'val mIoU {on_val["mIoU"]:.3f}  IoU {[round(x, 2) for x in on_val["IoU"]]}  '
                      f'training images mIoU {on_seen["mIoU"]:.3f}  {time.time() - start:.0f} s', flush=True)
            if step == args.steps:
                break


if __name__ == '__main__':
    main()
