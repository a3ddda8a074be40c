"""The hand-off: a trained checkpoint becomes a bundle for a target (precision policy, int8, ONNX)."""
