"""Post-training quantization of diffusion transformers: `quantize(model, QuantConfig(...), calibration)`.

The engine is plain PyTorch with no Streamlit and nothing from `analysis`; see quant.api for the pipeline,
quant.methods for one file per method and quant.io for saving a quantized model.
"""
from quant.api import (METHODS, QuantConfig, QuantResult, quantize, quantize_with_details, read_quantized,
                       write_quantized)

__all__ = ["METHODS", "QuantConfig", "QuantResult", "quantize", "quantize_with_details", "write_quantized",
           "read_quantized"]
