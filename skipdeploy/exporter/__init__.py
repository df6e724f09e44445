"""Checkpoint to export directory. Needs torch, transformers and onnx (the ``export`` extra)."""
