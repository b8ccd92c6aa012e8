"""fp: no quantization; the engine returns an unmodified copy (the reference every variant is compared with)."""
NAME = "fp"
QUANTIZES = False
NEEDS_ACTIVATIONS = False  # vectors from weights only: no extra FP pass


def compute(model, groups, stats, config) -> dict:
    return {}
