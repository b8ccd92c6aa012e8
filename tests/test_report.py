"""Typed results: a QuantReport reads back reports written before a field existed (and keeps keys it does not
know), and Variant.of is the one place that decides what FP, a quantized variant and a custom model are."""
from __future__ import annotations

from analysis.quantization.pipeline import Variant
from analysis.quantization.report import QuantReport
from quant.config import QuantConfig, quantizes


def test_an_old_report_reads_back_with_defaults_and_keeps_unknown_keys():
    old = {"method": "ptq4dit", "w_bits": 4, "a_bits": 8, "rel_rms": 0.2, "rel_rms_per_timestep": {"999": 0.3, "1": 0.1},
           "layer_error": {"pos_embed.proj": 0.01}, "seconds": 1.5, "a_field_from_a_newer_version": [1, 2]}
    r = QuantReport.from_dict(old)
    assert r.rel_rms == 0.2 and r.rel_rms_per_timestep == {999: 0.3, 1: 0.1} and r.cpu_seconds == 0.0
    assert r.recon is None and r.balance == {} and r.quantize_seconds is None
    assert r.extra == {"a_field_from_a_newer_version": [1, 2]}
    d = r.to_dict()
    assert d["a_field_from_a_newer_version"] == [1, 2] and d["method"] == "ptq4dit" and "extra" not in d
    assert r["rel_rms"] == 0.2 and r.get("missing", "none") == "none"  # read access for dict-shaped code


def test_fp_is_the_absence_of_quantization(tiny_bundle):
    assert not quantizes(None) and not quantizes("fp") and not quantizes({"method": "fp"})
    assert not QuantConfig(method="fp").quantizes and QuantConfig(method="baseline").quantizes
    assert quantizes("custom")  # a model quantized elsewhere
    fp = Variant.of("FP", None, tiny_bundle)
    assert fp.is_fp and fp.bundle is tiny_bundle and fp.config_dict() == {"method": "fp"}
    assert Variant.of("FP", tiny_bundle, tiny_bundle).is_fp
    other = tiny_bundle.with_denoiser(tiny_bundle.denoiser, name="copy")
    custom = Variant.of("copy", other, tiny_bundle)
    assert not custom.is_fp and custom.config_dict() == {"method": "custom"}
    quantized = Variant("q", other, config=QuantConfig(method="baseline", w_bits=8, a_bits=8))
    assert Variant.of("q", quantized, tiny_bundle) is quantized and quantized.config_dict()["method"] == "baseline"
