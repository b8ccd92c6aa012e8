import time

import pytest
import torch

from analysis.models.bundle import ModelLoadError
from analysis.models.loading import available_models, load
from tests.conftest import make_tiny_dit


def test_bundled_model_loads(bundled):
    t = bundled.denoiser
    assert type(t).__name__ == "DiTTransformer2DModel"
    assert t.config.norm_type == "ada_norm_zero"
    assert bundled.num_classes == 10 and bundled.null_label == 10
    assert bundled.latent_shape == (1, 16, 16) and bundled.image_shape == (1, 16, 16)
    assert bundled.vae is None and bundled.bundled
    assert not any(p.requires_grad for p in t.parameters())
    # the block structure every method relies on (docs/ARCHITECTURE.md, "The family table")
    blk = t.transformer_blocks[0]
    assert blk.norm1.linear.out_features == 6 * t.inner_dim
    assert {"to_q", "to_k", "to_v"} <= {n for n, _ in blk.attn1.named_children()}


def test_pipeline_folder_with_vae(tiny_bundle):
    assert tiny_bundle.latent_shape == (4, 8, 8)
    assert tiny_bundle.image_shape == (3, 16, 16)  # two VAE levels: 2x upsampling
    assert tiny_bundle.scheduler_config["num_train_timesteps"] == 1000
    assert not tiny_bundle.bundled


def test_bare_transformer_folder(tmp_path):
    make_tiny_dit(learned_sigma=False).save_pretrained(tmp_path, safe_serialization=True)
    bundle = load(str(tmp_path))
    assert bundle.vae is None and bundle.latent_shape == (4, 8, 8)


def test_folder_without_safetensors_is_refused(tmp_path):
    make_tiny_dit().save_pretrained(tmp_path, safe_serialization=False)
    with pytest.raises(ModelLoadError, match="safetensors"):
        load(str(tmp_path))


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load(str(tmp_path / "nope"))


def test_missing_hub_id_fails_fast_with_advice():
    # An id in no cache and on no hub: fails whether or not this machine has network access.
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        load("dqlab-tests/no-such-dit")
    assert time.perf_counter() - start < 30
    msg = str(info.value)
    assert "dqlab-tests/no-such-dit" in msg and "folder" in msg and "--model" in msg


def test_unknown_bundled_name():
    with pytest.raises(ModelLoadError, match="bundled:dit-mnist"):
        load("bundled:nope")


def test_available_models_lists_bundled():
    rows = {r["name"]: r for r in available_models()}
    assert rows["bundled:dit-mnist"]["available"] is True
    assert "facebook/DiT-XL-2-256" in rows


def test_cuda_request_without_gpu_is_an_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ModelLoadError, match="no CUDA"):
        load("bundled:dit-mnist", device="cuda")


def test_a_nan_weight_is_refused_at_load_naming_the_tensor(tmp_path, capsys):
    """One NaN in the class embedding once loaded silently, sampled black images and scored label agreement 1.0."""
    from safetensors.torch import load_file, save_file

    from analysis.models.bundle import ModelLoadError
    from analysis.models.loading import load
    from tests.conftest import run_cli, save_pipeline_folder

    folder = save_pipeline_folder(tmp_path / "m", with_vae=False)
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    key = next(k for k in tensors if "class_embedder.embedding_table" in k)
    tensors[key][3, 0] = float("nan")
    save_file(tensors, str(weights))
    with pytest.raises(ModelLoadError, match="class_embedder.embedding_table.weight holds NaN"):
        load(str(folder))
    code, out, err = run_cli(capsys, "sample", "--model", str(folder), "--classes", "3", "--seeds", "0",
                             "--steps", "2", "--out", str(tmp_path / "g.png"))
    assert code == 2 and out == "" and err.count("\n") == 1 and "NaN" in err
    assert not (tmp_path / "g.png").exists()


def test_non_finite_samples_are_an_error_naming_them(tiny_bundle):
    """A model whose outputs overflow (as float16 can) must not hand back images made of NaN."""
    import copy

    from analysis.models.bundle import NonFiniteError
    from analysis.models.sampling import sample

    broken = copy.deepcopy(tiny_bundle.denoiser)
    with torch.no_grad():
        broken.proj_out_2.bias.fill_(float("inf"))
    with pytest.raises(NonFiniteError, match="sampled latents of images 0-1"):
        sample(tiny_bundle.with_denoiser(broken), [1, 2], [0, 0], steps=2)


def test_bundled_assets_are_package_data_found_through_importlib_resources():
    """`pip install .` (not only -e) must find the bundled model: the files are the `assets` package's data,
    looked up through importlib.resources, never relative to a source file."""
    import importlib.resources
    from pathlib import Path

    from analysis.evaluation.classifier import CLASSIFIER_DIR
    from analysis.models.loading import BUNDLED
    from analysis.models.resources import asset_path

    root = Path(str(importlib.resources.files("assets")))
    assert asset_path() == root
    assert BUNDLED["bundled:dit-mnist"] == root / "dit-mnist" and CLASSIFIER_DIR == root / "digit-classifier"
    assert (root / "dit-mnist" / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    source = Path(__file__).resolve().parents[1]
    for module in ("analysis/models/loading.py", "analysis/evaluation/classifier.py"):
        assert "parents[" not in (source / module).read_text(), module
