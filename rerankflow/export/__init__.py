"""Stage 4: ONNX export with a parity check, INT8 quantization, TensorRT engines."""
