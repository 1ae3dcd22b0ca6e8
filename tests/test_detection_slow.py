"""Learning runs of both detectors on geometry-only shapes, with the ``auto`` recipe and no tuning flag (slow).

The data: ``hatnet det shapes`` scenes (300 training, 60 held-out images of 96-128 px; circles, squares and
triangles, each in a random colour on a random background, some overlapping), so only a shape's geometry
tells its class. Each run is ``hatnet det train --arch ARCH --data DIR --out RUN --threads 1`` (the auto
recipe: the images' own scale, 600 steps, ...), scored by ``hatnet det eval --json``.

The bar is the issue's target (AP 0.3). A broken model, trained the same way on the same images with the
training labels shuffled between the instances (boxes and masks kept), can find shapes but not tell them
apart; the trained model must score at least MARGIN above it. (The broken model comes near the bar on its
own: with boxes this good, RetinaNet with shuffled labels scored bbox AP 0.26 on this test's images after
600 steps, against 0.46 trained.) On this project's 2-core CPU, shared with three or four other runs, a
RetinaNet run took 33-40 minutes and a Mask R-CNN run about two hours (docs/detection.md).
"""
import json
import shutil

import numpy as np
import pytest

from hatnet.data.detection import write_shapes_dataset
from test_detection import run
from test_engine import one_thread  # noqa: F401  (autouse fixture: one intra-op thread)

pytestmark = pytest.mark.slow

TARGET = {'retinanet': 'bbox_AP', 'maskrcnn': 'segm_AP'}
BAR = 0.3
MARGIN = 0.1  # AP that telling the shapes apart adds over the shuffled-labels model
SEED = 11  # not a seed the fast tests or docs/detection.md use


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    return write_shapes_dataset(tmp_path_factory.mktemp('shapes'), 300, 60, size=(96, 128), seed=SEED)


def shuffled_labels(data, out):
    """A copy of ``data`` whose training instances carry a random permutation of their categories."""
    shutil.copytree(data, out)
    path = out / 'annotations' / 'instances_train2017.json'
    coco = json.loads(path.read_text())
    labels = np.random.default_rng(0).permutation([a['category_id'] for a in coco['annotations']])
    for ann, label in zip(coco['annotations'], labels.tolist()):
        ann['category_id'] = label
    path.write_text(json.dumps(coco))
    return out


def train_and_evaluate(data, val_data, arch, out, capsys):
    run(['det', 'train', '--arch', arch, '--data', str(data), '--out', str(out), '--threads', '1',
         '--device', 'cpu'])
    capsys.readouterr()
    run(['det', 'eval', '--data', str(val_data), '--checkpoint', str(out), '--json', '--workers', '0',
         '--device', 'cpu'])
    return json.loads(capsys.readouterr().out)


# Measured with the auto recipe's 8 images per step (docs/detection.md): on this test's images (`hatnet det
# shapes DIR --seed 11`) RetinaNet's trained run scored bbox AP 0.460 (0.509 against 0.269 shuffled on an Intel
# Xeon with AMX); on seed 1 RetinaNet 0.501, Mask R-CNN segm AP 0.48.
@pytest.mark.parametrize('arch', ['retinanet', 'maskrcnn'])
def test_auto_recipe_learns_geometry_and_a_broken_model_does_not(shapes, tmp_path, arch, capsys):
    key = TARGET[arch]
    trained = train_and_evaluate(shapes, shapes, arch, tmp_path / 'run', capsys)
    broken = train_and_evaluate(shuffled_labels(shapes, tmp_path / 'shuffled'), shapes, arch, tmp_path / 'broken',
                                capsys)
    print(arch, key, 'trained', round(trained[key], 3), 'shuffled labels', round(broken[key], 3))
    assert trained[key] >= BAR
    assert trained[key] >= broken[key] + MARGIN
