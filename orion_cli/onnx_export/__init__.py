"""A transformers checkpoint as an ONNX decoder graph with past key values, and its fp32 weights.

Shared by `orion quantize` (which replaces the matmul weights with block-quantized
operators) and `orion serve --engine onnxruntime` (which serves the fp32 model
from its cache): graph.py exports the weightless graph through optimum's export
config, tensors.py reads the checkpoint under the graph's parameter names,
parameters.py writes them as initializers, float_model.py puts it together.
"""
