"""Segmentation metrics against a hand-computed confusion matrix; sliding-window and flip inference."""
import math

import pytest
import torch
from torch import nn

from hatnet.tasks.segmentation import confusion_matrix, predict_probs, segmentation_metrics, sliding_window

IGNORE = 255


class FixedPrediction(nn.Module):
    """A 'model' that predicts the class index stored in the image's first channel."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x):
        return 10. * nn.functional.one_hot(x[:, 0].long(), self.num_classes).permute(0, 3, 1, 2).float()


def _image(prediction):
    return torch.tensor(prediction, dtype=torch.float32)[None].expand(3, -1, -1)


def test_metrics_match_a_hand_computed_confusion_matrix():
    # two images; 255 is ignored; class 3 is predicted but never annotated; class 4 occurs nowhere
    targets = [torch.tensor([[0, 0, 1], [1, 2, 255]]), torch.tensor([[1, 0]])]
    predictions = [[[0, 1, 1], [1, 2, 0]], [[3, 0]]]
    loader = [([_image(predictions[0])], [targets[0]]), ([_image(predictions[1])], [targets[1]])]
    confusion = confusion_matrix(FixedPrediction(5), loader, torch.device('cpu'), num_classes=5, ignore_index=IGNORE)
    #   rows: annotation 0..4, columns: prediction 0..4
    expected = torch.tensor([[2, 1, 0, 0, 0],
                             [0, 2, 0, 1, 0],
                             [0, 0, 1, 0, 0],
                             [0, 0, 0, 0, 0],
                             [0, 0, 0, 0, 0]])
    assert torch.equal(confusion, expected)

    metrics = segmentation_metrics(confusion)
    iou = [2 / (3 + 2 - 2), 2 / (3 + 3 - 2), 1 / 1, 0 / 1]          # TP / (TP + FP + FN)
    acc = [2 / 3, 2 / 3, 1 / 1]                                    # TP / (TP + FN), annotated classes
    assert metrics['mIoU'] == pytest.approx(sum(iou) / 4)
    assert metrics['mAcc'] == pytest.approx(sum(acc) / 3)
    assert metrics['aAcc'] == pytest.approx(5 / 7)
    assert metrics['IoU'][:4] == pytest.approx(iou) and math.isnan(metrics['IoU'][4])
    assert math.isnan(metrics['Acc'][3]) and math.isnan(metrics['Acc'][4])


def test_logits_are_resized_to_the_annotation():
    """Evaluation runs on a downscaled image; the prediction is compared at the annotation's full size."""
    target = torch.zeros(8, 8, dtype=torch.int64)
    target[:, 4:] = 1
    small = _image([[0, 0, 1, 1]] * 4)  # the same picture at half the size
    confusion = confusion_matrix(FixedPrediction(2), [([small], [target])], torch.device('cpu'), 2, IGNORE)
    assert torch.equal(confusion, torch.tensor([[32, 0], [0, 32]]))


@pytest.mark.parametrize('size', [(70, 100), (40, 41), (20, 30)])
def test_sliding_window_equals_whole_image_for_a_pointwise_model(size):
    torch.manual_seed(0)
    model = nn.Conv2d(3, 4, 1)
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        torch.testing.assert_close(sliding_window(model, x, 32), model(x))


def test_sliding_window_covers_every_pixel_with_overlapping_windows():
    calls = []

    def model(x):
        calls.append(tuple(x.shape[-2:]))
        return torch.ones(1, 2, *x.shape[-2:])

    logits = sliding_window(model, torch.zeros(1, 3, 70, 100), 32)
    # stride 21: rows start at 0, 21, 38 (the last one shifted back to end at the border), columns at 0..68
    assert len(calls) == 3 * 5 and set(calls) == {(32, 32)}
    assert torch.equal(logits, torch.ones(1, 2, 70, 100))


def test_flip_averages_with_the_mirrored_prediction():
    # a 'model' that sees only the left half as class 1: with flip, both halves get probability 0.5
    def model(x):
        logits = torch.zeros(1, 2, *x.shape[-2:])
        logits[:, 1, :, :x.shape[-1] // 2] = 100.
        logits[:, 0, :, x.shape[-1] // 2:] = 100.
        return logits

    probs = predict_probs(model, torch.zeros(1, 3, 4, 6), (4, 6), flip=True)
    torch.testing.assert_close(probs, torch.full((1, 2, 4, 6), 0.5))
    probs = predict_probs(model, torch.zeros(1, 3, 4, 6), (8, 12))
    assert probs.shape == (1, 2, 8, 12) and probs[0, 1, :, :6].min() > 0.99
