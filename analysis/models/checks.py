"""Checks of a diffusers model folder's files before anything is built from them, shared by the loaders of model
folders (analysis.models.loading) and of saved quantized folders (analysis.models.saved). The bounded readers and
path guards themselves live in quant.guards."""
from __future__ import annotations

from pathlib import Path

import torch

from analysis.models.bundle import ModelLoadError
from quant import guards

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"  # what diffusers' from_pretrained reads


def read_json(path: Path) -> dict:
    """A config file of a model folder: size and depth bounded, an object (quant.guards)."""
    return guards.read_json(path)


def weight_headers(mdir: Path) -> dict:
    """{name: (dtype, shape)} of the weight file(s) diffusers will read from `mdir` (one file, or the shards an
    index names, each proven to lie inside `mdir`), from their headers alone."""
    single = mdir / WEIGHTS_NAME
    index = mdir / f"{WEIGHTS_NAME}.index.json"
    if single.is_file():
        return guards.safetensors_header(single)
    if index.is_file():
        shards = read_json(index).get("weight_map")
        if not isinstance(shards, dict) or not all(isinstance(v, str) for v in shards.values()):
            raise ModelLoadError(f"{index} has no weight_map of tensor -> shard file")
        headers = {}
        for shard in sorted(set(shards.values())):
            headers.update(guards.safetensors_header(guards.inside(mdir, shard)))
        return headers
    found = sorted(p.name for p in mdir.glob("*.safetensors"))
    raise ModelLoadError(f"{mdir} has no {WEIGHTS_NAME}" + (f" (found {', '.join(found[:3])})" if found else "")
                         + "; this project loads diffusers' safetensors weights only (save them with "
                         "save_pretrained(safe_serialization=True))")


def checked_module(cls, mdir: Path, what: str) -> torch.nn.Module:
    """`cls` from the diffusers folder `mdir`, after its config's sizes are bounded (quant.guards), the model is
    built on the meta device and counted, and the weight file's keys and shapes match it exactly: a folder that
    would allocate gigabytes, or hold another model's or incomplete weights, is refused naming what differs."""
    config_path = mdir / "config.json"
    config = read_json(config_path)
    guards.check_sizes(config, str(config_path))
    expected = guards.check_parameter_count(lambda: cls.from_config(config), str(config_path))
    guards.check_state_keys(expected, weight_headers(mdir), str(mdir / WEIGHTS_NAME))
    try:
        return cls.from_pretrained(mdir, use_safetensors=True)
    except Exception as exc:  # diffusers raises several types for malformed folders
        raise ModelLoadError(f"could not load the {what} in {mdir}: {str(exc).splitlines()[0][:300]}") from None


def check_scheduler_config(cfg: dict, where: str) -> dict:
    """The training schedule's fields the samplers read (analysis.models.sampling.make_scheduler), checked by type
    and range so that a damaged file fails here, naming itself, and not inside a sampler later."""
    g = guards
    g.check_int(cfg.get("num_train_timesteps", 1000), "num_train_timesteps", where, 2, 100_000)
    for key in ("beta_start", "beta_end"):
        if key in cfg:
            g.check_number(cfg[key], key, where, 1e-8, 0.999)
    if "beta_schedule" in cfg and cfg["beta_schedule"] not in ("linear", "scaled_linear", "squaredcos_cap_v2"):
        raise g.UntrustedFileError(f"{where}: beta_schedule {cfg['beta_schedule']!r} is not one of linear, "
                                   "scaled_linear, squaredcos_cap_v2")
    if "prediction_type" in cfg and cfg["prediction_type"] not in ("epsilon", "v_prediction", "sample"):
        raise g.UntrustedFileError(f"{where}: prediction_type {cfg['prediction_type']!r} is not one of epsilon, "
                                   "v_prediction, sample")
    betas = cfg.get("trained_betas")
    if betas is not None:
        if not isinstance(betas, list) or len(betas) != cfg.get("num_train_timesteps", 1000) \
                or not all(g.is_number(b) and 0 < b < 1 for b in betas):
            raise g.UntrustedFileError(f"{where}: trained_betas must be num_train_timesteps numbers in (0, 1)")
    return cfg


def check_bundle_meta(meta: dict, where: str) -> dict:
    """bundle.json's sampling defaults: guidance values are finite numbers in [0, 100]."""
    for key in ("default_guidance", "eval_guidance"):
        if key in meta:
            guards.check_number(meta[key], key, where, 0.0, 100.0)
    return meta


def num_classes(family: str, cfg) -> int:
    """Classes a user may ask for, as the family declares them (quant.families: FAMILY.num_classes), checked to
    be a count."""
    from quant.families import FAMILIES

    try:
        n = FAMILIES[family].num_classes(cfg)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from None
    if not guards.is_int(n) or n < 0:
        raise ModelLoadError(f"the {family} config gives {n!r} classes; its class count field is damaged")
    return n
