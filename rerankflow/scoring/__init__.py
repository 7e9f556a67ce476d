"""Reranker scoring: the torch scorer, the ONNX scorer (the one ONNX inference path), the endpoint client, the score cache."""
