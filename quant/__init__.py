"""Post-training quantization of diffusion transformers: `quantize(model, QuantConfig(...), calibration)`.

The engine is plain PyTorch with no Streamlit; see quant.api for the pipeline and quant.methods for one file
per method.
"""
from quant.api import (METHODS, QuantConfig, QuantResult, load_quantized, quantize, quantize_with_details,
                       save_quantized)

__all__ = ["METHODS", "QuantConfig", "QuantResult", "quantize", "quantize_with_details", "save_quantized",
           "load_quantized"]
