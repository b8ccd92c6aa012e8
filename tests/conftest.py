"""Shared fixtures: the bundled model, and tiny random diffusers DiTs saved to temporary folders."""
from __future__ import annotations

from analysis.threads import configure

# The lab's thread policy (idle OpenMP workers sleep, one thread per usable CPU), set before torch makes
# its pool: the suite then takes about the same time on a machine other jobs keep busy (see analysis.threads).
configure()

import pytest  # noqa: E402
import torch  # noqa: E402


def make_tiny_dit(in_channels: int = 4, learned_sigma: bool = True, layers: int = 2, sample_size: int = 8,
                  heads: int = 2, head_dim: int = 8, num_classes: int = 10, seed: int = 0):
    """A random DiTTransformer2DModel with DiT-XL/2's block structure at toy size."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=in_channels,
                                 out_channels=2 * in_channels if learned_sigma else in_channels, num_layers=layers,
                                 sample_size=sample_size, patch_size=2, num_embeds_ada_norm=num_classes).eval()


def run_cli(capsys, *argv):
    """Run `dqlab *argv` in-process: (exit code, stdout, stderr)."""
    from analysis.cli import main

    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def make_tiny_vae(latent_channels: int = 4):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4).eval()


def save_pipeline_folder(folder, with_vae: bool = True):
    """A DiTPipeline-style folder: transformer/, scheduler/ and optionally vae/, all safetensors."""
    from diffusers import DDIMScheduler

    make_tiny_dit().save_pretrained(folder / "transformer", safe_serialization=True)
    DDIMScheduler(num_train_timesteps=1000).save_pretrained(folder / "scheduler")
    if with_vae:
        make_tiny_vae().save_pretrained(folder / "vae", safe_serialization=True)
    return folder


@pytest.fixture
def one_torch_thread():
    """One torch thread for tests of many tiny ops, where a second thread only adds waiting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    return save_pipeline_folder(tmp_path_factory.mktemp("tiny_dit"))


@pytest.fixture(scope="session")
def tiny_bundle(tiny_folder):
    from analysis.models.loading import load

    return load(str(tiny_folder), device="cpu")


@pytest.fixture(scope="session")
def bundled():
    from analysis.models.loading import load

    return load("bundled:dit-mnist", device="cpu")
