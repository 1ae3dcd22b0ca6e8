"""Deployment: ONNX export with dynamic batch / height / width, and an onnxruntime runner."""
from .onnx import OnnxRunner, export_onnx, load_model

__all__ = ['OnnxRunner', 'export_onnx', 'load_model']
