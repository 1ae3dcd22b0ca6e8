"""Short CPU training runs of both detectors lift COCO AP clearly above an untrained model (slow).

The data: 64 training and 16 held-out 64x64 images of coloured shapes (tests/detection_shapes.py). Each run
is 200 AdamW steps of batch 4 through ``hatnet det train`` (about 2 minutes for RetinaNet and 9 for Mask R-CNN
on one busy CPU core), scored by ``hatnet det eval --json``.
"""
import json

import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from detection_shapes import write_shapes_dataset
from hatnet.engine import find_recipe, load_recipe
from hatnet.tasks.detection import DetectionConfig, DetectionTask
from test_detection import run
from test_engine import one_thread  # noqa: F401  (autouse fixture: one intra-op thread)

pytestmark = pytest.mark.slow


@pytest.mark.parametrize('arch', ['retinanet', 'maskrcnn'])
def test_short_training_lifts_ap_above_an_untrained_model(tmp_path, arch, capsys):
    data = write_shapes_dataset(tmp_path / 'shapes', train=64, val=16, size=(64, 64), radius=(0.2, 0.3),
                                max_shapes=2)
    recipe = load_recipe(find_recipe(f'coco_{arch}_1x'))
    # small images with one or two objects: fewer sampled RoIs keep Mask R-CNN's mask head cheap
    recipe.update(lr=3e-4, min_size=64, max_size=64, roi_batch_size=64, workers=0, device='cpu')
    (tmp_path / 'recipe.yaml').write_text(yaml.safe_dump(recipe))
    keys = ['bbox_AP', 'segm_AP'] if arch == 'maskrcnn' else ['bbox_AP']

    torch.manual_seed(0)
    task_keys = DetectionConfig.__dataclass_fields__
    task = DetectionTask(DetectionConfig(**{k: v for k, v in recipe.items() if k in task_keys}, data=str(data)))
    val_loader = DataLoader(task.build_datasets()[1], batch_size=8, collate_fn=task.collate_fn)
    untrained = task.evaluate(task.build_model(), val_loader, torch.device('cpu'))

    run(['det', 'train', '--data', str(data), '--recipe', str(tmp_path / 'recipe.yaml'), '--out', str(tmp_path / 'run'),
         '--iters', '200', '--batch-size', '4', '--eval-every', '200'])
    capsys.readouterr()
    run(['det', 'eval', '--data', str(data), '--checkpoint', str(tmp_path / 'run'), '--json', '--workers', '0',
         '--device', 'cpu'])
    trained = json.loads(capsys.readouterr().out)
    print(arch, {k: (round(untrained[k], 3), round(trained[k], 3)) for k in keys})
    for key in keys:
        assert trained[key] > untrained[key] + 0.05 and trained[key] > 3 * untrained[key]
