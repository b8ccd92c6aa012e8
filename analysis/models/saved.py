"""A quantized model bundle on disk: what `dqlab quantize --out DIR` writes and `--model DIR` reads.

Folder layout:
    quant_config.json   quant.io's record (format tag, QuantConfig, model class and config, packed weight
                        shapes) plus the scheduler config, the bundle's sampling metadata, the base
                        source it was made from and its recipe (analysis.quantization.recipe: source, config and
                        calibration, which rebuild it)
    model.safetensors   the quantized denoiser (quant.io: low-bit weights bit-packed)
    vae/                the base bundle's VAE when it has one (not quantized)
    text_encoder/, tokenizer/   a text-to-image model's FP text encoder and tokenizer (not quantized)
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
    meta = {"name": bundle.name, "num_classes": bundle.num_classes, "latent_shape": list(bundle.latent_shape),
            "vae_scale_factor": bundle.vae_scale_factor, "default_guidance": bundle.default_guidance,
            "eval_guidance": bundle.eval_guidance, "bundled": bundle.bundled}
    if bundle.text is not None:
        meta["text"] = {"kind": bundle.text.kind, "max_length": bundle.text.max_length,
                        "use_mask": bundle.text.use_mask, "negative_prompt": bundle.negative_prompt}
    return meta


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
        if Path(name).name != name or name.startswith(".") or name in (META, WEIGHTS, "vae", "text_encoder", "tokenizer"):
            raise ValueError(f"extra file name {name!r} must be a plain file name other than the model's own")
    with atomic_folder(folder) as tmp:
        if bundle.vae is not None:
            bundle.vae.save_pretrained(tmp / "vae", safe_serialization=True)
        text_digest = None
        if bundle.text is not None:  # the FP text encoder and tokenizer travel with the model (never quantized)
            bundle.text.model.save_pretrained(tmp / "text_encoder", safe_serialization=True)
            bundle.text.tokenizer.save_pretrained(tmp / "tokenizer")
            text_digest = _vae_digest(tmp / "text_encoder") + _vae_digest(tmp / "tokenizer")
        write_quantized(bundle.denoiser, config, tmp,
                        meta={"base_source": base_source, "scheduler_config": bundle.scheduler_config,
                              "bundle": _bundle_meta(bundle),
                              "recipe": recipe.to_dict() if recipe is not None else None,
                              "vae_sha256": _vae_digest(tmp / "vae") if bundle.vae is not None else None,
                              "text_sha256": text_digest})
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
    text, negative = _load_text(folder, b.get("text"), meta.get("text_sha256"))
    return ModelBundle(name=name, denoiser=denoiser, scheduler_config=scheduler_config,
                       num_classes=num_classes, latent_shape=tuple(b["latent_shape"]), vae=vae,
                       vae_scale_factor=float(b.get("vae_scale_factor", 0.18215)),
                       default_guidance=b.get("default_guidance", 1.5),
                       eval_guidance=b.get("eval_guidance", b.get("default_guidance", 1.5)),
                       bundled=b.get("bundled", False), quant_config=config.to_dict(), text=text, negative_prompt=negative)


def _load_text(folder: Path, info: dict | None, digest: str | None):
    """(TextEncoder, negative prompt) of a saved text-to-image model, (None, "") for other models; its
    text_encoder/ and tokenizer/ must match the checksum recorded beside them."""
    if info is None:
        return None, ""
    if digest is None or _vae_digest(folder / "text_encoder") + _vae_digest(folder / "tokenizer") != digest:
        raise ModelLoadError(f"{folder / 'text_encoder'} or {folder / 'tokenizer'} does not match the checksum in "
                             f"{META}; the folder was edited or damaged: save it again with dqlab quantize --out")
    from analysis.models.prompts import TextEncoder, check_prompt
    from analysis.models.text_encoders import MAX_TOKENS, load_text_encoder, load_tokenizer

    if not isinstance(info, dict) or info.get("kind") not in ("t5", "clip") or \
            not isinstance(info.get("max_length"), int) or not 1 <= info["max_length"] <= MAX_TOKENS:
        raise ModelLoadError(f"{folder / 'quant_config.json'}: bad text encoder record {str(info)[:200]}")
    encoder, kind = load_text_encoder(folder / "text_encoder")
    tokenizer = load_tokenizer(folder / "tokenizer")
    text = TextEncoder.build(tokenizer, encoder.eval().requires_grad_(False), info["max_length"],
                             bool(info.get("use_mask")), kind)
    try:
        negative = check_prompt(info.get("negative_prompt") or "", "negative prompt")
    except ValueError as exc:
        raise ModelLoadError(f"{folder / 'quant_config.json'}: {exc}") from None
    return text, negative
