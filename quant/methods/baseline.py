"""baseline: plain post-training quantization (min-max / percentile / MSE ranges), no channel balancing."""
from quant.methods import Method

METHOD = Method(name="baseline", order=1,
                help="plain post-training quantization: static min-max (or searched) ranges, no channel balancing")
