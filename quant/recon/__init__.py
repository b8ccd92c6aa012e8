"""Block-wise optimization after the scales are set: PTQ4DiT's AdaRound reconstruction and DilateQuant's
block-wise distillation (BKD), one engine with one unit loop (engine.py) over the units each family declares
(quant.families), and one small file per piece:

    adaround.py   learned rounding: rectified sigmoid, regulariser, beta schedule, hardening
    bkd.py        straight-through weights and weight steps, snapped back onto their grid
    act_range.py  learned activation step sizes (LSQ) and zero points, per timestep with TPQ
    trainers.py   what each mode trains and its loss
    cache.py      the only activations held: one unit's inputs and outputs
"""
from quant.recon.engine import ReconReport, calibration_rows, reconstruct

__all__ = ["reconstruct", "ReconReport", "calibration_rows"]
