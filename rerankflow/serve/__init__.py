"""The ranking service: a NIM-compatible FastAPI app over the ONNX scorer."""
