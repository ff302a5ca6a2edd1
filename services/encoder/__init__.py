"""Encoder service: pretrained text model -> L2-normalised vectors (ONNX Runtime)."""
