"""The shared scene generator: only geometry tells the classes apart, and the masks fit the image."""
import numpy as np
import pytest

from hatnet.data.shapes import SHAPE_CLASSES, Scene, draw_scene


@pytest.fixture(scope='module')
def scenes():
    rng = np.random.default_rng(2024)
    return [draw_scene(rng, 64, 80) for _ in range(300)]


def _instance_colours(scenes, recolour=None):
    """(mean RGB, class id) of every instance; ``recolour(class_id)`` paints each shape by its class first."""
    colours, classes = [], []
    for scene in scenes:
        for class_id, mask in scene.instances:
            pixels = scene.image[mask & ~scene.ignore].astype(np.float64)
            if recolour is not None:
                pixels = pixels * 0.2 + recolour(class_id)
            colours.append(pixels.mean(0))
            classes.append(class_id)
    return np.array(colours), np.array(classes)


def _nearest_mean_accuracy(colours, classes):
    """Accuracy on the second half of a nearest-class-mean colour classifier fitted on the first half."""
    half = len(classes) // 2
    means = np.stack([colours[:half][classes[:half] == c].mean(0) for c in range(1, len(SHAPE_CLASSES) + 1)])
    predicted = 1 + np.argmin(((colours[half:, None] - means[None]) ** 2).sum(-1), 1)
    return (predicted == classes[half:]).mean()


def test_colour_does_not_give_the_class_away(scenes):
    colours, classes = _instance_colours(scenes)
    assert len(classes) > 450 and set(classes) == {1, 2, 3}
    assert _nearest_mean_accuracy(colours, classes) < 1 / 3 + 0.1   # chance: 1/3
    # the classifier does find colour when colour is the class (the old generator's scenes)
    class_colours = {1: np.array([200, 40, 40]), 2: np.array([40, 200, 40]), 3: np.array([40, 40, 200])}
    colours, classes = _instance_colours(scenes, recolour=class_colours.get)
    assert _nearest_mean_accuracy(colours, classes) > 0.9


def test_size_does_not_give_the_class_away(scenes):
    areas = {c: [mask.sum() for s in scenes for k, mask in s.instances if k == c] for c in (1, 2, 3)}
    medians = [np.median(a) for a in areas.values()]
    assert max(medians) < 1.35 * min(medians)


def test_masks_are_disjoint_visible_parts_that_fit_the_image(scenes):
    for scene in scenes:
        assert isinstance(scene, Scene) and scene.image.shape == (64, 80, 3) and scene.image.dtype == np.uint8
        assert 1 <= len(scene.instances) <= 3 and scene.ignore.shape == (64, 80)
        owners = np.zeros((64, 80), int)
        for class_id, mask in scene.instances:
            assert 1 <= class_id <= len(SHAPE_CLASSES) and mask.dtype == bool and mask.shape == (64, 80)
            assert (mask & ~scene.ignore).sum() > 50   # every placed shape stays recognisable
            owners += mask
        assert owners.max() == 1
        labels = scene.labels()
        assert set(np.unique(labels)) <= {0, 1, 2, 3, 255}
        assert (labels == 255).sum() == scene.ignore.sum() and scene.ignore.mean() < 0.1
        for (class_id, mask), box in zip(scene.instances, scene.boxes()):
            assert (labels[mask & ~scene.ignore] == class_id).all()
            ys, xs = np.nonzero(mask)
            assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_ignored_pixels_are_borders_between_regions(scenes):
    on_border = ignored = 0
    for scene in scenes:
        owner = np.zeros(scene.ignore.shape, int)
        for i, (_, mask) in enumerate(scene.instances):
            owner[mask] = i + 1
        padded = np.pad(owner, 1, mode='edge')
        # the owners of each pixel's 3x3 neighbourhood differ exactly where two regions meet
        window = np.lib.stride_tricks.sliding_window_view(padded, (3, 3)).reshape(*owner.shape, 9)
        border = (window != owner[..., None]).any(-1)
        on_border += (border & scene.ignore).sum()
        ignored += scene.ignore.sum()
    assert ignored > 0 and on_border / ignored > 0.95


def test_later_shapes_occlude_earlier_ones():
    rng = np.random.default_rng(7)
    overlapping = 0
    for _ in range(150):
        scene = draw_scene(rng, 48, 48, max_shapes=3)
        masks = [m for _, m in scene.instances]
        for i, earlier in enumerate(masks):
            for later in masks[i + 1:]:
                # an earlier shape's mask ends where a later shape covers it: touching, never overlapping
                grown = earlier.copy()
                grown[1:] |= earlier[:-1]
                grown[:, 1:] |= earlier[:, :-1]
                overlapping += (grown & later).any()
    assert overlapping > 10   # shapes do overlap in a fair share of scenes


def test_each_class_has_its_geometry():
    """Unoccluded shapes away from the border: the fraction of their box they fill is a circle's pi/4, at most a
    triangle's 1/2, and from 1/2 (turned by 45 degrees) to 1 for a square."""
    rng = np.random.default_rng(3)
    fill = {1: [], 2: [], 3: []}
    for _ in range(200):
        scene = draw_scene(rng, 80, 80, max_shapes=1)
        (class_id, mask), = scene.instances
        x0, y0, x1, y1 = scene.boxes()[0]
        if x0 > 0 and y0 > 0 and x1 < 80 and y1 < 80:
            fill[class_id].append(mask.sum() / ((x1 - x0) * (y1 - y0)))
    assert all(len(f) > 20 for f in fill.values())
    assert np.allclose(fill[1], np.pi / 4, atol=0.06)
    assert max(fill[3]) < 0.56 and min(fill[2]) > 0.46 and max(fill[2]) > 0.75


def test_scenes_are_reproducible():
    a, b = (draw_scene(np.random.default_rng(5), 48, 48) for _ in range(2))
    assert np.array_equal(a.image, b.image) and np.array_equal(a.labels(), b.labels())


@pytest.mark.parametrize('task', ['segmentation', 'detection'])
def test_generated_sets_of_one_seed_share_their_validation_images(task, tmp_path):
    """A larger training set of the same seed must not draw the smaller set's validation images (which would
    then be trained on): each split has its own stream, and a smaller training set is the start of a larger."""
    if task == 'segmentation':
        from hatnet.data.segmentation import write_shapes_dataset
        train, val = 'images/train', 'images/val'
    else:
        from hatnet.data.detection import write_shapes_dataset
        train, val = 'train2017', 'val2017'
    small, large = (write_shapes_dataset(tmp_path / str(n), num_train=n, num_val=2, size=(32, 40), seed=7)
                    for n in (2, 4))

    def pictures(root, split):
        return [path.read_bytes() for path in sorted((root / split).glob('*.png'))]

    assert pictures(small, val) == pictures(large, val)
    assert pictures(small, train) == pictures(large, train)[:2]
    assert not set(pictures(large, val)) & set(pictures(large, train))
