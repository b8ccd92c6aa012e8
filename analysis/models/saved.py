"""A quantized model bundle on disk: what `dqlab quantize --out DIR` writes and `--model DIR` reads.

Folder layout:
    quant_config.json   quant.io's record (format tag, QuantConfig, model class and config, packed weight
                        shapes) plus the scheduler config, the bundle's sampling metadata, the base
                        source it was made from and its recipe (analysis.quantization.recipe: source, config and
                        calibration, which rebuild it)
    model.safetensors   the quantized denoiser (quant.io: low-bit weights bit-packed)
    vae/                the base bundle's VAE when it has one (not quantized)
The folder is self-contained: loading it never needs the base model, whose weights may have changed since.
"""
from __future__ import annotations

from pathlib import Path

from analysis.models.bundle import ModelBundle, ModelLoadError
from quant.config import QuantConfig
from quant import guards
from quant.guards import atomic_folder
from quant.io import META, WEIGHTS, QuantizedFolderError, read_quantized, write_quantized


def _bundle_meta(bundle: ModelBundle) -> dict:
    return {"name": bundle.name, "num_classes": bundle.num_classes, "latent_shape": list(bundle.latent_shape),
            "vae_scale_factor": bundle.vae_scale_factor, "default_guidance": bundle.default_guidance,
            "eval_guidance": bundle.eval_guidance, "bundled": bundle.bundled}


def save_quantized(bundle: ModelBundle, config: QuantConfig, folder, base_source: str | None = None,
                   recipe=None, extra_files: dict[str, str] | None = None) -> Path:
    """Write a quantized bundle to `folder`, with the FP source it came from, the
    analysis.quantization.recipe.Recipe that made it when there is one (read_recipe reads it back) and
    `extra_files` (name -> text, e.g. a report) beside it.

    The folder is written whole beside its destination and renamed into place (quant.guards.atomic_folder):
    a job killed midway leaves the old folder as it was, and nothing of an older model (a stale vae/) survives
    in the new one."""
    if not isinstance(bundle, ModelBundle):
        raise ValueError(f"expected a ModelBundle, got {type(bundle).__name__}; wrap a quantized denoiser with "
                         "fp_bundle.with_denoiser(model)")
    for name in extra_files or {}:
        if Path(name).name != name or name.startswith(".") or name in (META, WEIGHTS, "vae"):
            raise ValueError(f"extra file name {name!r} must be a plain file name other than the model's own")
    with atomic_folder(folder) as tmp:
        if bundle.vae is not None:
            bundle.vae.save_pretrained(tmp / "vae", safe_serialization=True)
        write_quantized(bundle.denoiser, config, tmp,
                        meta={"base_source": base_source, "scheduler_config": bundle.scheduler_config,
                              "bundle": _bundle_meta(bundle),
                              "recipe": recipe.to_dict() if recipe is not None else None,
                              "vae_sha256": _vae_digest(tmp / "vae") if bundle.vae is not None else None})
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(folder)


def _vae_digest(vae_dir: Path) -> str:
    """sha256 over the VAE folder's files (names and bytes), kept in the checksummed record."""
    import hashlib

    h = hashlib.sha256()
    for path in sorted(p for p in vae_dir.rglob("*") if p.is_file()):
        h.update(path.relative_to(vae_dir).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def load_quantized(folder) -> ModelBundle:
    """Rebuild a saved quantized bundle (on the CPU, float32). Raises ModelLoadError naming what is wrong: every
    recorded field is checked by type and range, and the latent shape and classes against the model's config."""
    from analysis.models import checks
    from quant.families import family_of

    folder = Path(folder)
    try:
        denoiser, config, meta = read_quantized(folder)
        where = f"{folder / META}"
        b, scheduler_config = meta.get("bundle"), meta.get("scheduler_config")
        if not isinstance(b, dict) or not isinstance(scheduler_config, dict):
            raise guards.UntrustedFileError(f"{where} has no bundle or scheduler_config object; save the model "
                                            "again with dqlab quantize --out")
        checks.check_scheduler_config(scheduler_config, f"{where} (scheduler_config)")
        checks.check_bundle_meta(b, f"{where} (bundle)")
        if not isinstance(b.get("name"), str) or not isinstance(b.get("bundled", False), bool):
            raise guards.UntrustedFileError(f"{where}: bundle.name must be text and bundle.bundled true or false")
        guards.check_number(b.get("vae_scale_factor", 0.18215), "bundle.vae_scale_factor", where, 1e-6, 1e6)
        cfg = denoiser.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        if b.get("latent_shape") != [cfg.in_channels, size, size]:
            raise guards.UntrustedFileError(f"{where}: bundle.latent_shape {b.get('latent_shape')!r} is not the "
                                            f"model's [{cfg.in_channels}, {size}, {size}]")
        num_classes = checks.num_classes(family_of(denoiser), cfg)
        if b.get("num_classes") != num_classes:
            raise guards.UntrustedFileError(f"{where}: bundle.num_classes {b.get('num_classes')!r} is not the "
                                            f"model's {num_classes}")
        vae = None
        recorded = meta.get("vae_sha256")
        if meta["version"] >= 2 and (folder / "vae").exists() != (recorded is not None):
            raise guards.UntrustedFileError(f"{folder}: a vae/ folder is {'present' if recorded is None else 'missing'} "
                                            f"but {META} records {'none' if recorded is None else 'one'}")
        if recorded is not None and _vae_digest(folder / "vae") != recorded:
            raise guards.UntrustedFileError(f"{folder / 'vae'} does not match the checksum in {META}; the folder was "
                                            "edited or damaged: save it again with dqlab quantize --out")
        if (folder / "vae").exists():
            from diffusers import AutoencoderKL

            vae = checks.checked_module(AutoencoderKL, folder / "vae", "VAE")
    except (QuantizedFolderError, guards.UntrustedFileError) as exc:
        raise ModelLoadError(str(exc)) from None
    name = b["name"] if config.label in b["name"] else f"{b['name']} [{config.label}]"
    return ModelBundle(name=name, denoiser=denoiser, scheduler_config=scheduler_config,
                       num_classes=num_classes, latent_shape=tuple(b["latent_shape"]), vae=vae,
                       vae_scale_factor=float(b.get("vae_scale_factor", 0.18215)),
                       default_guidance=b.get("default_guidance", 1.5),
                       eval_guidance=b.get("eval_guidance", b.get("default_guidance", 1.5)),
                       bundled=b.get("bundled", False), quant_config=config.to_dict())
