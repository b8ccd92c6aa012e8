"""baseline: plain post-training quantization (min-max / percentile / MSE ranges), no channel balancing."""
NAME = "baseline"
QUANTIZES = True


def compute(model, groups, stats, config) -> dict:
    return {}
