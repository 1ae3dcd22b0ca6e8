"""torch.compile: the backbone is one graph (no graph breaks) that serves new input sizes without recompiling."""
import pytest
import torch
from torch._dynamo.testing import CompileCounter

from hatnet.bench import compile_model
from hatnet.models.hat_net import HatNet


def _small_hat_net() -> HatNet:
    # every code path of the full models (grid attention with ragged cells, global step, plain MHSA stage)
    return HatNet(embed_dims=(16, 32, 48, 64), head_dim=16, depths=(1, 1, 1, 1), num_classes=10).eval()


def test_compile_is_one_graph_for_every_size():
    torch._dynamo.reset()
    model = _small_hat_net()
    counter = CompileCounter()
    run = compile_model(model, backend=counter, fullgraph=True)  # fullgraph: a graph break raises
    # ragged and whole cells, square and not; sizes from 113 px keep >= 2 grid cells per side in every stage
    for size in [(120, 120), (150, 200), (230, 130)]:
        images = torch.randn(2, 3, *size)
        with torch.inference_mode():
            assert torch.allclose(run(images), model(images), atol=1e-5)
    assert counter.frame_count == 1


@pytest.mark.slow
def test_inductor_matches_eager():
    torch._dynamo.reset()
    model = _small_hat_net()
    run = compile_model(model)
    for size in [(128, 160), (224, 224)]:
        images = torch.randn(2, 3, *size)
        with torch.inference_mode():
            assert (run(images) - model(images)).abs().max().item() < 1e-4
