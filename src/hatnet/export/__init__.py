"""Deployment: ONNX export with dynamic batch / height / width, and an onnxruntime runner."""
from .hat_net_onnx import onnx_forms
from .onnx import OnnxRunner, export_onnx

__all__ = ['OnnxRunner', 'export_onnx', 'onnx_forms']
