"""Loading model bundles (analysis.models.bundle) from any of three sources.

    load("bundled:dit-mnist")            the small DiT trained by scripts/train_dit.py, shipped in assets/
    load("bundled:unet-mnist")           the small UNet trained by scripts/train_unet.py, shipped in assets/
    load("/path/to/folder")              a local diffusers folder: DiTPipeline layout (transformer/, scheduler/,
                                         vae/), DDPMPipeline layout (unet/, scheduler/), or a bare
                                         DiTTransformer2DModel / UNet2DModel folder
    load("/path/to/pipeline")            a text-to-image pipeline folder: PixArtAlphaPipeline / PixArtSigmaPipeline
                                         (transformer/, text_encoder/ T5, tokenizer/, vae/, scheduler/) or
                                         StableDiffusionPipeline (unet/, text_encoder/ CLIP, tokenizer/, vae/, ...)
    load("facebook/DiT-XL-2-256")        the hub, when this machine has network access or a cached copy

A text-to-image bundle is sampled from prompts instead of classes (analysis.models.prompts): its text encoder and VAE
stay in the model's FP precision and are never quantized; only the denoiser is.

The family (dit / unet) is decided here from the model class by the family table (quant.families), which also
says where a pipeline folder keeps the denoiser and how many classes it has; everything downstream asks the
bundle. An unconditional model (a UNet without class embedding) samples from seeds alone.

Weights load from safetensors only, and no remote code ever runs.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

from analysis.models import checks
from analysis.models.bundle import ModelBundle, ModelLoadError, resolve_device, resolve_dtype
from analysis.models.resources import asset_path
from analysis.models.saved import load_quantized
from quant import guards
from quant.denoiser import TEXT_FAMILIES
from quant.families import CLASS_FAMILIES, FAMILIES

ASSETS = asset_path()
BUNDLED = {"bundled:dit-mnist": asset_path("dit-mnist"), "bundled:unet-mnist": asset_path("unet-mnist")}
TRAINING_SCRIPTS = {"bundled:dit-mnist": "scripts/train_dit.py", "bundled:unet-mnist": "scripts/train_unet.py"}
# Where each family's weights sit in a pipeline folder (DiTPipeline / DDPMPipeline layouts): the family table's.
SUBFOLDERS = {name: family.subfolder for name, family in FAMILIES.items()}
# A bare model folder's config names its class (the hub's DiT configs name the generic Transformer2DModel).
MODEL_CLASSES = {**CLASS_FAMILIES, **{c: f.name for f in FAMILIES.values() for c in f.config_classes}}
HUB_EXAMPLES = ["facebook/DiT-XL-2-256", "facebook/DiT-XL-2-512", "google/ddpm-cifar10-32",
                "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", "stable-diffusion-v1-5/stable-diffusion-v1-5"]
# Text-to-image pipelines (model_index.json's _class_name): (family, denoiser folder, tokens per prompt, default
# guidance). Tokens: PixArt-sigma's T5 context is 300, PixArt-alpha's 120; Stable Diffusion uses the tokenizer's 77.
TEXT_PIPELINES = {"PixArtSigmaPipeline": ("pixart", "transformer", 300, 4.5),
                  "PixArtAlphaPipeline": ("pixart", "transformer", 120, 4.5),
                  "StableDiffusionPipeline": ("sd", "unet", None, 7.5)}


FINITE_CHECK_ELEMENTS = 1 << 24  # elements per group of the finite check: 64 MiB of float32 held at once


def check_weights_finite(bundle: "ModelBundle", source: str) -> None:
    """A NaN in a weight file samples black images without a word (and a classifier may still 'read' them):
    refuse such a model at load time, naming the first bad tensor. Small tensors are checked a group at a time
    (one isfinite over their concatenation): a check per tensor cost the bundled DiT 0.7 s of its 1 s load."""
    text = bundle.text.model if bundle.text is not None else None
    for part, module in ((SUBFOLDERS[bundle.family], bundle.denoiser), ("vae", bundle.vae),
                         ("text_encoder", text)):
        if module is None:
            continue
        group, size = [], 0
        for name, tensor in module.state_dict().items():
            if not tensor.is_floating_point():
                continue
            if tensor.numel() >= FINITE_CHECK_ELEMENTS:  # a large tensor alone: no copy of it
                _check_finite([(name, tensor)], source, part)
                continue
            group.append((name, tensor))
            size += tensor.numel()
            if size >= FINITE_CHECK_ELEMENTS:
                _check_finite(group, source, part)
                group, size = [], 0
        if group:
            _check_finite(group, source, part)


def _check_finite(group: list, source: str, part: str) -> None:
    flat = torch.cat([t.reshape(-1) for _, t in group]) if len(group) > 1 else group[0][1]
    if not bool(torch.isfinite(flat).all()):
        bad = next(n for n, t in group if not bool(torch.isfinite(t).all()))
        raise ModelLoadError(f"{source}: the weight {part}.{bad} holds NaN or inf values; the file is "
                             "damaged or was saved from a diverged run; re-export or re-train it")


def available_models() -> list[dict]:
    """What `load` accepts: the bundled models (with whether their weights are present) and hub examples."""
    rows = [{"name": name, "kind": "bundled", "path": str(path), "available": _bundled_present(path)}
            for name, path in BUNDLED.items()]
    rows += [{"name": hub_id, "kind": "hub", "path": None, "available": None} for hub_id in HUB_EXAMPLES]
    return rows


def load(source: str, device: str | torch.device | None = "cpu", dtype: str | torch.dtype | None = None) -> ModelBundle:
    """Load a model bundle from 'bundled:NAME', a local folder, or a hub id, onto `device` in `dtype`."""
    device, dtype = resolve_device(device), resolve_dtype(dtype)
    with _LOAD_LOCK:
        try:
            bundle = _load_source(source)
        except guards.UntrustedFileError as exc:
            raise ModelLoadError(str(exc)) from None
    bundle.denoiser.eval().requires_grad_(False)
    for part in (bundle.vae, bundle.text.model if bundle.text is not None else None):
        if part is not None:
            part.eval().requires_grad_(False)
    check_weights_finite(bundle, source)
    return bundle.to(device, dtype)


# diffusers (with accelerate) builds a model under a process-wide patch that puts new parameters on the meta
# device; a text encoder built by another thread meanwhile (two app sessions, or a rerun that starts while the
# interrupted one still loads) would get meta parameters. One load at a time.
_LOAD_LOCK = threading.RLock()


def _load_source(source: str) -> ModelBundle:
    if not isinstance(source, str) or not source.strip():
        raise ModelLoadError("no model given; pass bundled:dit-mnist, bundled:unet-mnist, a folder or a hub id")
    if source.startswith("bundled:"):
        if source not in BUNDLED:
            raise ModelLoadError(f"unknown bundled model {source!r}; available: {', '.join(BUNDLED)}")
        folder = BUNDLED[source]
        if not _bundled_present(folder):
            raise ModelLoadError(f"the weights of {source} are missing from {folder}; "
                                 f"train them with {TRAINING_SCRIPTS[source]}")
        bundle = _load_folder(folder, name=source, bundled=True)
    elif Path(source).expanduser().exists():
        bundle = _load_folder(Path(source).expanduser(), name=source)
    elif _looks_like_path(source):
        if not source.startswith((".", "/", "~")) and "\\" not in source:
            raise ModelLoadError(f"{source!r} is neither a folder on this machine nor a hub id: a hub id is exactly "
                                 "owner/name, such as facebook/DiT-XL-2-256; a folder must exist")
        raise ModelLoadError(f"model folder {source!r} does not exist; pass an existing diffusers folder, "
                             f"{' or '.join(repr(b) for b in BUNDLED)}, or a hub id such as facebook/DiT-XL-2-256")
    else:
        bundle = _load_hub(source)
    return bundle


def _looks_like_path(source: str) -> bool:
    # A hub id is exactly "owner/name"; anything else that does not exist was meant as a folder.
    return source.startswith((".", "/", "~")) or source.count("/") != 1


_read_json = checks.read_json


def _bundled_present(folder: Path) -> bool:
    return any((folder / sub / "config.json").exists() for sub in SUBFOLDERS.values())


def _denoiser_dir(folder: Path) -> tuple[Path, str]:
    """(folder holding the denoiser's config and weights, its family) for a pipeline or a bare model folder."""
    for family, sub in SUBFOLDERS.items():
        if family not in TEXT_FAMILIES and (folder / sub / "config.json").exists():  # text: _text_pipeline
            cls = _read_json(folder / sub / "config.json").get("_class_name")
            if cls is not None and MODEL_CLASSES.get(cls) != family:
                raise ModelLoadError(f"{folder / sub / 'config.json'} describes a {cls}, but a {sub}/ folder holds a "
                                     f"{' or '.join(FAMILIES[family].classes)}; the folder was assembled from two "
                                     "models: re-export it")
            return folder / sub, family
    if not (folder / "config.json").exists():
        raise ModelLoadError(f"{folder} is not a diffusers model folder: no transformer/config.json, "
                             "unet/config.json or config.json")
    cls = _read_json(folder / "config.json").get("_class_name", "")
    if MODEL_CLASSES.get(cls) in TEXT_FAMILIES:
        raise ModelLoadError(f"{folder} holds a bare {cls}: a text-to-image denoiser needs its pipeline folder "
                             "(model_index.json with text_encoder/, tokenizer/, vae/, scheduler/ beside it)")
    if not isinstance(cls, str) or cls not in MODEL_CLASSES:
        raise ModelLoadError(f"{folder / 'config.json'} describes a {cls or 'model without _class_name'}; "
                             f"this lab loads {', '.join(sorted(MODEL_CLASSES))}")
    return folder, MODEL_CLASSES[cls]


def _load_folder(folder: Path, name: str, bundled: bool = False) -> ModelBundle:
    """A pipeline-style folder (transformer/ or unet/, scheduler/, optional vae/) or a bare model folder."""
    import diffusers
    from diffusers import AutoencoderKL

    quantized = folder / "quant_config.json"
    if quantized.exists():
        return load_quantized(folder)  # a model saved by `dqlab quantize`
    pipeline = _text_pipeline(folder)
    if pipeline is not None:
        return _load_text_pipeline(folder, name, pipeline)
    mdir, family = _denoiser_dir(folder)
    cls = getattr(diffusers, FAMILIES[family].classes[0])  # a diffusers class by name: no code from the folder
    denoiser = checks.checked_module(cls, mdir, SUBFOLDERS[family])
    vae = None
    if (folder / "vae" / "config.json").exists():
        vae = checks.checked_module(AutoencoderKL, folder / "vae", "VAE")
    sched_path = folder / "scheduler" / "scheduler_config.json"
    scheduler_config = checks.check_scheduler_config(_read_json(sched_path), str(sched_path)) \
        if sched_path.exists() else {"num_train_timesteps": 1000}
    meta_path = folder / "bundle.json"
    meta = checks.check_bundle_meta(_read_json(meta_path), str(meta_path)) if meta_path.exists() else {}
    cfg = denoiser.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    num_classes = _num_classes(family, cfg)
    guidance = 1.0 if num_classes == 0 else 1.5  # an unconditional model has no guidance
    return ModelBundle(
        name=name, denoiser=denoiser, scheduler_config=scheduler_config, vae=vae, num_classes=num_classes,
        latent_shape=(cfg.in_channels, size, size),
        default_guidance=meta.get("default_guidance", 4.0 if bundled else guidance),
        eval_guidance=meta.get("eval_guidance", guidance), bundled=bundled)


_num_classes = checks.num_classes


def _load_hub(repo_id: str) -> ModelBundle:
    """Load a DiTPipeline or DDPMPipeline repo from the local hub cache, or download it when the network allows."""
    from huggingface_hub import snapshot_download

    patterns = ["model_index.json", "transformer/*", "unet/*", "vae/*", "scheduler/*", "tokenizer/*",
                "text_encoder/*.json", "text_encoder/*.safetensors"]
    try:
        folder = snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True)
    except Exception:
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
            raise ModelLoadError(*_hub_hint(repo_id, "HF_HUB_OFFLINE is set and it is not in the local cache"))
        os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
        try:
            folder = snapshot_download(repo_id, allow_patterns=patterns, etag_timeout=5)
        except Exception as exc:
            raise ModelLoadError(*_hub_hint(repo_id, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")) from None
    return _load_folder(Path(folder), name=repo_id)


def _hub_hint(repo_id: str, reason: str) -> tuple[str, str]:
    """(command-line message, app message) for a hub model that could not be fetched."""
    cli = (f"could not load {repo_id!r} from the Hugging Face hub ({reason}). Without network access, download "
           f"it where you have access (`hf download {repo_id}`), copy the folder here, and pass its path "
           f"instead, e.g. --model ./{repo_id.split('/')[-1]}; or use bundled:dit-mnist or bundled:unet-mnist")
    ui = (f"**{repo_id}** could not be loaded from the Hugging Face hub: this machine cannot reach it and it is not "
          f"in the local cache ({reason}). Download the model where you have network access (`hf download "
          f"{repo_id}`), copy the folder to this machine, then pick **Local folder** in the sidebar and enter its "
          "path; or pick **Bundled** to use one of the small digit models that ship with the lab.")
    return cli, ui


# ---- text-to-image pipelines ---------------------------------------------------------------------------------
def _text_pipeline(folder: Path) -> str | None:
    """The text-to-image pipeline class a folder holds (model_index.json, or the denoiser's class), else None."""
    index = folder / "model_index.json"
    if index.exists():
        cls = _read_json(index).get("_class_name", "")
        if cls in TEXT_PIPELINES:
            return cls
        if "Pipeline" in cls and (folder / "text_encoder").exists():
            raise ModelLoadError(f"{folder} holds a {cls}; this lab loads text-to-image pipelines "
                                 f"{', '.join(TEXT_PIPELINES)} (and DiTPipeline / DDPMPipeline folders)")
    for cls, (family, sub, _, _) in TEXT_PIPELINES.items():
        cfg = folder / sub / "config.json"
        if cfg.exists() and MODEL_CLASSES.get(_read_json(cfg).get("_class_name", "")) == family:
            return cls
    return None


def _load_text_pipeline(folder: Path, name: str, pipeline: str) -> ModelBundle:
    """A PixArt-alpha / PixArt-sigma or Stable Diffusion pipeline folder: the denoiser (to be quantized), and the
    FP text encoder, tokenizer, VAE and scheduler around it."""
    import diffusers
    from diffusers import AutoencoderKL

    from analysis.models.prompts import TextEncoder
    from analysis.models.text_encoders import MAX_TOKENS, load_text_encoder, load_tokenizer, safetensors_only

    family, sub, tokens, guidance = TEXT_PIPELINES[pipeline]
    mdir = folder / sub
    safetensors_only(mdir, sub)
    cls = {"pixart": "PixArtTransformer2DModel", "sd": "UNet2DConditionModel"}[family]
    found = _read_json(mdir / "config.json").get("_class_name")
    if found != cls:
        raise ModelLoadError(f"{mdir / 'config.json'} describes a {found}; a {pipeline} holds a {cls}")
    denoiser = checks.checked_module(getattr(diffusers, cls), mdir, sub)  # bounded config, exact weight keys
    encoder, kind = load_text_encoder(folder / "text_encoder")
    tokenizer = load_tokenizer(folder / "tokenizer")
    meta_path = folder / "bundle.json"
    meta = checks.check_bundle_meta(_read_json(meta_path), str(meta_path)) if meta_path.exists() else {}
    tokens = meta.get("max_sequence_length") or tokens or tokenizer.model_max_length
    if not isinstance(tokens, int):
        raise ModelLoadError(f"{folder}: tokens per prompt {tokens!r} is not a whole number")
    if not 1 <= tokens <= MAX_TOKENS:
        raise ModelLoadError(f"{folder}: {tokens} tokens per prompt; between 1 and {MAX_TOKENS} are supported")
    width = encoder.config.d_model if kind == "t5" else encoder.config.hidden_size
    want = denoiser.config.caption_channels if family == "pixart" else denoiser.config.cross_attention_dim
    if want != width:
        raise ModelLoadError(f"{folder}: the text encoder outputs {width} channels but the {sub} reads {want}")
    vae = None
    if (folder / "vae").exists():
        safetensors_only(folder / "vae", "VAE")
        vae = checks.checked_module(AutoencoderKL, folder / "vae", "VAE")
    sched_path = folder / "scheduler" / "scheduler_config.json"
    scheduler_config = _training_schedule(sched_path) if sched_path.exists() else {"num_train_timesteps": 1000}
    cfg = denoiser.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    text = TextEncoder.build(tokenizer, encoder, tokens, use_mask=family == "pixart", kind=kind)
    return ModelBundle(
        name=name, denoiser=denoiser, scheduler_config=scheduler_config, vae=vae, num_classes=0,
        latent_shape=(cfg.in_channels, size, size),
        vae_scale_factor=float(vae.config.scaling_factor) if vae is not None else 1.0,
        default_guidance=meta.get("default_guidance", guidance), eval_guidance=meta.get("eval_guidance", guidance),
        text=text)


def _training_schedule(path: Path) -> dict:
    """The training-schedule fields of a pipeline's scheduler config, checked. PixArt-sigma ships a DPM-Solver
    config holding lambda_min_clipped = -Infinity (not JSON, refused by the strict reader): it is read with
    non-finite numbers allowed, then only the fields the samplers use are kept (all finite, checked)."""
    from analysis.models.sampling import SCHEDULE_KEYS

    if path.stat().st_size > guards.MAX_JSON_BYTES:
        raise ModelLoadError(f"{path} is larger than a scheduler config may be")
    raw = guards.loads_json(path.read_bytes().decode("utf-8", errors="replace"), str(path), allow_nan=True)
    kept = {k: v for k, v in raw.items() if k in SCHEDULE_KEYS}
    return checks.check_scheduler_config(kept, str(path))
