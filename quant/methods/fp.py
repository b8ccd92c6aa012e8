"""fp: no quantization; the engine returns an unmodified copy (the reference every variant is compared with)."""
NAME = "fp"
QUANTIZES = False


def compute(model, groups, stats, config) -> dict:
    return {}
