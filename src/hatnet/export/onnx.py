"""Export a timm model (hat_net or any other) to ONNX and run it with onnxruntime.

The graph is traced by ``torch.onnx.export`` with dynamic batch, height and width, so one file serves every
input size the model accepts (for hat_net: any size >= 32 x 32; the grid padding and its attention mask are
computed in the graph from the input size). The TorchScript-based exporter is used: the dynamo-based one
needs every shape expression of the grid padding proven by its symbolic solver, which fails for the
ceil-mode and modulo arithmetic of ragged grids. hat_net models are exported in their ONNX forms
(``hat_net_onnx.onnx_forms``), from a copy: the model passed in is left as it is.
"""
import io
import os
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..fileio import atomic_write
from ..errors import HatNetError
from .hat_net_onnx import onnx_forms

DEFAULT_OPSET = 18
MIN_OPSET = 17


def export_onnx(
        model: torch.nn.Module,
        path: os.PathLike,
        opset: int = DEFAULT_OPSET,
        example_size: Sequence[int] = (224, 224),
) -> Path:
    """Write ``model`` (in eval mode, float32, on CPU) to ``path`` with dynamic batch, height and width.

    Input ``images`` (batch, channels, height, width), output ``output``. Written atomically. ``model``
    itself is not changed (a copy is exported).
    """
    if opset < MIN_OPSET:
        raise HatNetError(f'opset {opset} is too old: the export needs opset >= {MIN_OPSET}')
    path = Path(path)
    model = onnx_forms(model).eval().float().cpu()
    example = torch.randn(2, getattr(model, 'in_chans', 3), *example_size)

    def write(tmp: str) -> None:
        import onnx

        exported = io.BytesIO()
        with warnings.catch_warnings(), torch.no_grad():
            # the tracer warns about every Python int it records from a shape; they are traced dynamically here
            warnings.simplefilter('ignore')
            torch.onnx.export(
                model, (example,), exported, dynamo=False, opset_version=opset, input_names=['images'],
                output_names=['output'], dynamic_axes={'images': {0: 'batch', 2: 'height', 3: 'width'},
                                                       'output': {0: 'batch'}})
        graph_model = onnx.load_from_string(exported.getvalue())
        _move_weights_into_loops(graph_model.graph)
        onnx.save(graph_model, tmp)

    atomic_write(path, write)
    return path


def _move_weights_into_loops(graph) -> None:
    """Make the weights used only inside a Loop body initializers of that body (``graph``: an onnx GraphProto).

    The exporter leaves them in the main graph, and onnxruntime converts a convolution to its blocked-layout
    (NCHWc) kernel only when the weight is an initializer of the convolution's own graph: the convolutions of
    hat_net's MLP loops (``OnnxInvertedResidual``) would fall back to a slower kernel.
    """
    initializers = {init.name: init for init in graph.initializer}
    used_in_main_graph = {name for node in graph.node for name in node.input} | {out.name for out in graph.output}
    users = {}  # initializer name -> the Loop bodies that read it
    for node in graph.node:
        for body in (attr.g for attr in node.attribute if node.op_type == 'Loop' and attr.name == 'body'):
            for name in {name for body_node in body.node for name in body_node.input}:
                if name in initializers:
                    users.setdefault(name, []).append(body)
    moved = {name for name, bodies in users.items() if len(bodies) == 1 and name not in used_in_main_graph}
    for name in moved:
        users[name][0].initializer.append(initializers[name])
    if moved:
        kept = [init for init in graph.initializer if init.name not in moved]
        graph.ClearField('initializer')
        graph.initializer.extend(kept)


class OnnxRunner:
    """An onnxruntime session used like a module: ``runner(images) -> output`` on torch tensors."""

    def __init__(self, path: os.PathLike, threads: Optional[int] = None, memory_arena: bool = True,
                 spin_wait: bool = True):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.enable_cpu_mem_arena = memory_arena
        # spin-waiting worker threads answer the next call faster but keep their cores busy between calls
        options.add_session_config_entry('session.intra_op.allow_spinning', '1' if spin_wait else '0')
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=['CPUExecutionProvider'])
        except Exception as e:  # onnxruntime raises its own exception types for unreadable files
            raise HatNetError(f'cannot load ONNX model {path}: {str(e).splitlines()[0]}') from None
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = images.detach().float().cpu().contiguous()
        return torch.from_numpy(self.session.run(None, {self.input_name: images.numpy()})[0])
