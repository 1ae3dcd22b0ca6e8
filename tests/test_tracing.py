"""hat_net with PyTorch's own tracing tools: torch.fx (torchvision's feature extraction), torch.export with
dynamic batch / height / width, and torch.compile(dynamic=True), each against the eager model."""
import time

import pytest
import timm
import torch
from torch.export import Dim
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from hatnet.models import HatNet, optimize_for_cpu

ODD_SHAPES = [(1, 3, 250, 333), (3, 3, 97, 65), (2, 3, 320, 240)]


def small_hat_net() -> HatNet:
    """Every part of hat_net (grids of 8 and 7, pooling 8 / 4 / 2, global last stage) at a fraction of the cost."""
    torch.manual_seed(0)
    return HatNet(embed_dims=(16, 32, 48, 64), head_dim=16, depths=(1, 1, 1, 1), num_classes=5).eval()


@pytest.mark.slow  # 30 s while the machine is shared; the small model below runs by default
def test_torchvision_feature_extractor():
    model = timm.create_model('hat_net_tiny').eval()
    _, eval_nodes = get_graph_node_names(model)
    assert 'stages.2.blocks.5.attn.proj' in eval_nodes and 'head' in eval_nodes
    _check_extractor(model)


def test_torchvision_feature_extractor_on_the_cpu_inference_form():
    _check_extractor(optimize_for_cpu(small_hat_net()))  # the batch-sliced MLPs of hatnet's predictors


def _check_extractor(model):
    extractor = create_feature_extractor(model, {'stages.1': 'c3', 'stages.3': 'c5', 'head': 'logits'})
    images = torch.randn(2, 3, 97, 65, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        features = extractor(images)
        expected = model.forward_intermediates(images, indices=[1, 3], intermediates_only=True)
        logits = model(images)
    # the traced graph runs the plain MLP; the eager CPU form fuses its SiLUs (float32 rounding apart)
    for got, want in [(features['c3'], expected[0]), (features['c5'], expected[1]), (features['logits'], logits)]:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_feature_extractor_keeps_the_input_check():
    extractor = create_feature_extractor(small_hat_net(), ['stages.0'])
    with pytest.raises(Exception, match='image is too small: 16x40'):
        extractor(torch.randn(1, 3, 16, 40))


@pytest.mark.slow
def test_torch_export_with_dynamic_batch_height_and_width():
    """One exported program for every batch and size >= 33, the same numbers as eager at odd sizes.

    ``backed_size_oblivious``: sizes of 1 (a single grid cell in a row at small sizes) take the general path
    instead of a guard on them (see docs/export.md).
    """
    model = small_hat_net()
    dims = {0: Dim('batch', min=1, max=256), 2: Dim('height', min=33, max=4096), 3: Dim('width', min=33, max=4096)}
    with torch.fx.experimental._config.patch(backed_size_oblivious=True):
        program = torch.export.export(model, (torch.randn(2, 3, 224, 224),), dynamic_shapes=(dims,))
    exported = program.module()
    for shape in ODD_SHAPES + [(1, 3, 33, 40)]:
        images = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            assert (exported(images) - model(images)).abs().max().item() <= 1e-5


def _graphs_for(shapes, **compile_options) -> int:
    """How many graphs dynamo captures for calls at ``shapes`` (each checked against eager)."""
    from torch._dynamo.utils import counters

    model = small_hat_net()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, dynamic=True, **compile_options)
    for shape in shapes:
        images = torch.randn(shape, generator=torch.Generator().manual_seed(2))
        with torch.inference_mode():
            assert (compiled(images) - model(images)).abs().max().item() <= 1e-4
    return counters['stats']['unique_graphs']


@pytest.mark.slow  # 15-80 s, depending on the machine's load
def test_dynamo_captures_one_graph_for_every_batch_and_size():
    """The graph capture of torch.compile(dynamic=True), without the code generation (backend 'eager')."""
    # not square at first: dynamo would tie height to width ("duck sizing") and capture again for the next;
    # batches >= 2 and sizes whose grids are at least two cells wide in every stage (>= 113) share one graph
    assert _graphs_for([(2, 3, 250, 333), (3, 3, 320, 240), (5, 3, 129, 161), (4, 3, 224, 224)], backend='eager') == 1
    # with size-oblivious reasoning also batch 1 and single-cell grid rows (97 x 65: 1 x 1 cells at stride 16)
    with torch.fx.experimental._config.patch(backed_size_oblivious=True):
        assert _graphs_for([(2, 3, 250, 333), (1, 3, 97, 65)], backend='eager') == 1


@pytest.mark.slow
def test_torch_compile_dynamic_compiles_once(capsys):
    from torch._dynamo.utils import counters

    model = small_hat_net()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, dynamic=True)
    start = time.perf_counter()
    # not square at first: dynamo would tie height to width ("duck sizing") and compile again for the next;
    # sizes whose grids are at least two cells wide in every stage (>= 113): one graph serves them all
    for shape in [(2, 3, 250, 333), (3, 3, 320, 240), (5, 3, 129, 161), (4, 3, 224, 224)]:
        images = torch.randn(shape, generator=torch.Generator().manual_seed(2))
        with torch.inference_mode():
            assert (compiled(images) - model(images)).abs().max().item() <= 1e-4
    with capsys.disabled():
        print(f'\ntorch.compile(dynamic=True), 4 batch sizes and input sizes: {time.perf_counter() - start:.0f} s')
    assert counters['stats']['unique_graphs'] == 1
