"""baseline: plain post-training quantization (min-max / percentile / MSE ranges), no channel balancing."""
from quant.methods import Method


def compute(model, groups, stats, options) -> dict:
    return {}


METHOD = Method(name="baseline", compute=compute, order=1,
                help="plain post-training quantization: static min-max (or searched) ranges, no channel balancing")
