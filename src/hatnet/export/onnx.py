"""Export a timm model (hat_net or any other) to ONNX and run it with onnxruntime.

The graph is traced by ``torch.onnx.export`` with dynamic batch, height and width, so one file serves every
input size the model accepts (for hat_net: any size >= 32 x 32; the grid padding and its attention mask are
computed in the graph from the input size). The TorchScript-based exporter is used: the dynamo-based one
needs every shape expression of the grid padding proven by its symbolic solver, which fails for the
ceil-mode and modulo arithmetic of ragged grids. hat_net models are exported in their ONNX forms
(``hat_net_onnx.onnx_forms``), from a copy: the model passed in is left as it is.

A graph with hat_net modules refuses images under 32 x 32, as the PyTorch model does: a check node
(``input_at_least_32x32``) fails in onnxruntime, which :class:`OnnxRunner` reports as an InputError.
"""
import io
import os
import warnings
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch

from ..errors import HatNetError, InputError
from ..fileio import atomic_write
from ..models.hat_net import MIN_INPUT_SIZE, HierarchicalAttention
from .hat_net_onnx import onnx_forms

DEFAULT_OPSET = 18
MIN_OPSET = 17
SIZE_CHECK = 'input_at_least_{0}x{0}'  # name of the node that refuses smaller inputs


def export_onnx(
        model: torch.nn.Module,
        path: os.PathLike,
        opset: int = DEFAULT_OPSET,
        example_size: Sequence[int] = (224, 224),
        metadata: Optional[Dict[str, str]] = None,
) -> Path:
    """Write ``model`` (in eval mode, float32, on CPU) to ``path`` with dynamic batch, height and width.

    Input ``images`` (batch, channels, height, width), output ``output`` (its batch dimension, and for dense
    outputs such as segmentation logits (B, classes, H, W) or label maps (B, H, W) also its height and width,
    dynamic). Written atomically. ``model`` itself is not changed (a copy is exported). A model with hat_net
    modules refuses inputs under 32 x 32. ``metadata``: written to the file's metadata_props.
    """
    check_opset(opset)
    path = Path(path)
    model = onnx_forms(model).eval().float().cpu()
    example = torch.randn(2, getattr(model, 'in_chans', 3), *example_size)
    with torch.no_grad():
        output_rank = model(example).dim()
    dense_axes = {4: {2: 'out_height', 3: 'out_width'}, 3: {1: 'out_height', 2: 'out_width'}}
    output_axes = {0: 'batch', **dense_axes.get(output_rank, {})}
    min_size = MIN_INPUT_SIZE if any(isinstance(m, HierarchicalAttention) for m in model.modules()) else 0

    def write(tmp: str) -> None:
        import onnx

        exported = io.BytesIO()
        with warnings.catch_warnings(), torch.no_grad():
            # the tracer warns about every Python int it records from a shape; they are traced dynamically here
            warnings.simplefilter('ignore')
            torch.onnx.export(
                model, (example,), exported, dynamo=False, opset_version=opset, input_names=['images'],
                output_names=['output'], dynamic_axes={'images': {0: 'batch', 2: 'height', 3: 'width'},
                                                       'output': output_axes})
        graph_model = onnx.load_from_string(exported.getvalue())
        _move_weights_into_loops(graph_model.graph)
        if min_size:
            _add_input_size_check(graph_model.graph, min_size)
        set_metadata(graph_model, metadata or {})
        onnx.save(graph_model, tmp)

    atomic_write(path, write)
    return path


def set_metadata(graph_model, metadata: Dict[str, str]) -> None:
    """Key / value strings in an onnx ModelProto's metadata_props (what a user of the file needs to know)."""
    for key, value in metadata.items():
        entry = graph_model.metadata_props.add()
        entry.key, entry.value = key, value


def check_opset(opset: int) -> None:
    if opset < MIN_OPSET:
        raise HatNetError(f'opset {opset} is too old: the export needs opset >= {MIN_OPSET}')


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


def _add_input_size_check(graph, min_size: int) -> None:
    """Make the graph fail for images with a side under ``min_size`` (``graph``: an onnx GraphProto).

    ONNX has no assertion, so the check is a Reshape of a one-element tensor to the shape [1] if both sides
    are large enough, else [0] (``allowzero``: a literal 0, which one element cannot take, so onnxruntime
    stops with the node's name in its message). Its value, 1.0, multiplies the output, which keeps the check
    in the graph and leaves the output as it is.
    """
    from onnx import TensorProto, helper

    name = SIZE_CHECK.format(min_size)
    output = graph.output[0].name
    # the factor takes the output's type: float logits, or int64 label maps
    output_type = graph.output[0].type.tensor_type.elem_type or TensorProto.FLOAT
    unchecked = f'{output}_unchecked'
    for node in graph.node:
        node.output[:] = [unchecked if o == output else o for o in node.output]
    constant = lambda key, value, dtype: helper.make_node(  # noqa: E731
        'Constant', [], [f'{name}/{key}'], value=helper.make_tensor(f'{name}/{key}', dtype, [1], [value]))
    check = [
        constant('min', min_size, TensorProto.INT64),
        constant('one', 1 if output_type == TensorProto.INT64 else 1.0, output_type),
        helper.make_node('Shape', [graph.input[0].name], [f'{name}/size'], start=2, end=4),
        helper.make_node('ReduceMin', [f'{name}/size'], [f'{name}/smallest'], keepdims=1),
        helper.make_node('GreaterOrEqual', [f'{name}/smallest', f'{name}/min'], [f'{name}/ok']),
        helper.make_node('Cast', [f'{name}/ok'], [f'{name}/shape'], to=TensorProto.INT64),
        helper.make_node('Reshape', [f'{name}/one', f'{name}/shape'], [f'{name}/factor'], name=name, allowzero=1),
    ]
    # first in the graph, so that it runs before the model meets the small input
    nodes = check + list(graph.node) + [helper.make_node('Mul', [unchecked, f'{name}/factor'], [output])]
    graph.ClearField('node')
    graph.node.extend(nodes)


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
        options.log_severity_level = 4  # failures come back as exceptions (below); its log would repeat them
        try:
            self.session = ort.InferenceSession(str(path), options, providers=['CPUExecutionProvider'])
        except Exception as e:  # onnxruntime raises its own exception types for unreadable files
            raise HatNetError(f'cannot load ONNX model {path}: {str(e).splitlines()[0]}') from None
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = images.detach().float().cpu().contiguous()
        try:
            outputs = self.session.run(None, {self.input_name: images.numpy()})
        except Exception as e:  # onnxruntime's own exception types
            if SIZE_CHECK.format(MIN_INPUT_SIZE) not in str(e):
                raise
            raise InputError(f'image is too small: {images.shape[2]}x{images.shape[3]}, the model needs at least '
                             f'{MIN_INPUT_SIZE}x{MIN_INPUT_SIZE}') from None
        return torch.from_numpy(outputs[0])
