"""Deployment: ONNX export of models and of every task's runs (classifiers and Semantic FPN with dynamic
batch / height / width, detectors with their pre- and post-processing), and an onnxruntime runner."""
from .detection_onnx import export_detector_onnx, match_detections
from .hat_net_onnx import onnx_forms
from .onnx import OnnxRunner, export_onnx

__all__ = ['OnnxRunner', 'export_detector_onnx', 'export_onnx', 'match_detections', 'onnx_forms']
