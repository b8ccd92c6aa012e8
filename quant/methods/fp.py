"""fp: no quantization; the engine returns an unmodified copy (the reference every variant is compared with)."""
from quant.methods import Method


def compute(model, groups, stats, options) -> dict:
    return {}


METHOD = Method(name="fp", help="no quantization: the floating-point reference", compute=compute, quantizes=False,
                order=0)
