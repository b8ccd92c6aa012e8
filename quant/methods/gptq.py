"""GPTQ (Frantar et al., ICLR 2023): second-order weight rounding with the layer's input Hessian (quant.gptq).

H = 2 X^T X / n from the calibration inputs of each layer (all timesteps of the calibration run, as the
calibration spec draws them, with the activations already quantized), damping lambda = damp * mean(diag H),
Cholesky of H^-1, columns in lazy blocks, optional act-order. It only chooses the rounding: the scales
and the format stay the layer's weight quantizer's. Runs after any balancing, rotation or low-rank split,
so "ptq4dit+gptq" rounds the balanced weight, "svdquant+gptq" the residual.
"""
from __future__ import annotations

import dataclasses

from quant.gptq import gptq_model
from quant.methods import Method, checked
from quant.options import option


@dataclasses.dataclass
class Options:
    gptq_block: int = option(128, "GPTQ block", "columns per lazy batch update (the paper: 128)", low=1)
    gptq_damp: float = option(0.01, "GPTQ damping", "damping added to diag(H), as a fraction of its mean "
                              "(the paper: 0.01)", low=0.0, high=1.0, low_open=True)
    gptq_rows: int = option(256, "GPTQ rows", "calibration rows (drawn across every timestep) whose layer inputs "
                            "form the Hessians; each row brings all its tokens", low=1)
    gptq_act_order: bool = option(False, "GPTQ act-order", "quantize the columns in order of decreasing "
                                  "diag(H) (inputs with most energy first)")

    def __post_init__(self):
        checked(self)


def rounding(model, batches, options: Options) -> dict:
    return gptq_model(model, batches, options.gptq_block, options.gptq_damp, options.gptq_act_order,
                      options.gptq_rows)


METHOD = Method(name="gptq", rounding=rounding, options=Options, order=7,
                refuses=(("recon:adaround", "AdaRound learns each weight's rounding itself, replacing GPTQ's"),),
                help="GPTQ: round each weight column with the layer's input Hessian and move its error to the "
                     "columns not yet rounded")
