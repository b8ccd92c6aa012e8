"""baseline: plain post-training quantization (min-max / percentile / MSE ranges), no channel balancing."""
NAME = "baseline"
QUANTIZES = True
NEEDS_ACTIVATIONS = False  # vectors from weights only: no extra FP pass


def compute(model, groups, stats, config) -> dict:
    return {}
