import time

import pytest
import torch

from analysis.models import ModelLoadError, available_models, load
from tests.conftest import make_tiny_dit


def test_bundled_model_loads(bundled):
    t = bundled.transformer
    assert type(t).__name__ == "DiTTransformer2DModel"
    assert t.config.norm_type == "ada_norm_zero"
    assert bundled.num_classes == 10 and bundled.null_label == 10
    assert bundled.latent_shape == (1, 16, 16) and bundled.image_shape == (1, 16, 16)
    assert bundled.vae is None and bundled.bundled
    assert not any(p.requires_grad for p in t.parameters())
    # the block structure every method relies on (DESIGN.md section 3)
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
