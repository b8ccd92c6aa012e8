"""The quantization pipeline: calibration data, recipes, quantizing a bundle, per-layer sensitivity, and model
sizes and bit-operations."""
