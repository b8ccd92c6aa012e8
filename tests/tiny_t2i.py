"""Tiny random text-to-image pipelines with the real diffusers / transformers classes and their real configs'
structure at toy widths, saved the way the hub ships them (model_index.json + one folder per component,
safetensors only), and a word-level tokenizer built in code (no download):

    PixArt-sigma       PixArtSigmaPipeline: PixArtTransformer2DModel (adaLN-single, self-attention, cross-attention
                       to T5 embeddings, caption projection), T5EncoderModel, AutoencoderKL, DPM-Solver scheduler
    Stable Diffusion   StableDiffusionPipeline: UNet2DConditionModel (CrossAttnDownBlock2D / CrossAttnUpBlock2D,
                       UNetMidBlock2DCrossAttn), CLIPTextModel, AutoencoderKL, PNDM scheduler

    python -m tests.tiny_t2i OUT_DIR      writes OUT_DIR/pixart-sigma and OUT_DIR/sd (for trying the CLI and app)
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import torch

# The words every tokenizer here knows: those of the bundled prompt sets, plus a few for tests.
EXTRA_WORDS = "a photo of an the cat dog red blue green tree house car on in with at and sky".split()


def _vocabulary() -> list[str]:
    from analysis.models.prompts import read_prompt_set

    words = set(EXTRA_WORDS)
    for name in ("calibration", "evaluation"):
        for prompt in read_prompt_set(name):
            words.update(re.findall(r"\w+|[^\w\s]", prompt.lower()))
    return sorted(words)


def make_tokenizer(style: str, max_length: int):
    """A word-level fast tokenizer: T5 style (ids end with </s>, pad 0) or CLIP style (<|startoftext|> ...
    <|endoftext|>, padded with <|endoftext|>)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    if style == "t5":
        specials = ["<pad>", "</s>", "<unk>"]
    else:
        specials = ["<|startoftext|>", "<|endoftext|>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + _vocabulary())}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if style == "t5":
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                       model_max_length=max_length)
    tok.post_processor = processors.TemplateProcessing(single="<|startoftext|> $A <|endoftext|>",
                                                       special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", unk_token="<unk>", model_max_length=max_length)


def make_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4).eval()


def make_pixart_transformer(seed: int = 0, layers: int = 2, caption_channels: int = 32):
    """PixArt-sigma's transformer config (ada_norm_single, gelu-approximate, learned sigma, no size conditions)
    at width 32."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    return PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                    num_layers=layers, cross_attention_dim=32, sample_size=8, patch_size=2,
                                    caption_channels=caption_channels, use_additional_conditions=False,
                                    norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
                                    interpolation_scale=None).eval()


def make_t5(vocab_size: int, seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1)
    return T5EncoderModel(cfg).eval()


def make_sd_unet(seed: int = 0):
    """Stable Diffusion's UNet2DConditionModel layout (a plain and a cross-attention resolution, a cross-attention
    middle block) at widths 8/16 with 32-wide text embeddings."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=32,
                                attention_head_dim=4,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")).eval()


def make_clip(vocab_size: int, max_length: int, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=max_length, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1)
    return CLIPTextModel(cfg).eval()


def save_pixart_sigma(folder: Path, max_length: int = 300) -> Path:
    """A PixArtSigmaPipeline folder (T5 context of `max_length` tokens, as PixArt-sigma's 300)."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline

    tokenizer = make_tokenizer("t5", max_length)
    pipe = PixArtSigmaPipeline(tokenizer=tokenizer, text_encoder=make_t5(len(tokenizer)), vae=make_vae(),
                               transformer=make_pixart_transformer(),
                               scheduler=DPMSolverMultistepScheduler(beta_schedule="linear"))
    pipe.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def save_stable_diffusion(folder: Path, max_length: int = 77) -> Path:
    """A StableDiffusionPipeline folder (CLIP context of 77 tokens), without safety checker."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    tokenizer = make_tokenizer("clip", max_length)
    pipe = StableDiffusionPipeline(vae=make_vae(), text_encoder=make_clip(len(tokenizer), max_length),
                                   tokenizer=tokenizer, unet=make_sd_unet(),
                                   scheduler=PNDMScheduler(beta_start=0.00085, beta_end=0.012,
                                                           beta_schedule="scaled_linear", steps_offset=1,
                                                           skip_prk_steps=True),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "tiny-t2i")
    print(save_pixart_sigma(out / "pixart-sigma"))
    print(save_stable_diffusion(out / "sd"))
