"""fp: no quantization; the engine returns an unmodified copy (the reference every variant is compared with)."""
from quant.methods import Method

METHOD = Method(name="fp", help="no quantization: the floating-point reference", quantizes=False, order=0)
