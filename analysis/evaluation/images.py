"""Image grids and files: turning [N, C, H, W] tensors in [0, 1] into PNGs people can look at, and into the
uint8 RGB layout metric code reads."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_pil(image: torch.Tensor, scale: int = 1) -> Image.Image:
    """[C, H, W] in [0, 1] -> PIL image, enlarged `scale` times with nearest neighbour (keeps pixels crisp)."""
    arr = (image.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    img = Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img


def display_scale(height: int, target: int = 64) -> int:
    """How much to enlarge a small image so a grid cell is at least `target` pixels tall."""
    return max(1, target // height)


def make_grid(images: torch.Tensor, ncol: int, pad: int = 2, scale: int | None = None,
              col_labels: list[str] | None = None, target: int = 64) -> Image.Image:
    """Tile images row by row, `ncol` per row, with a `pad`-pixel dark border; small images are enlarged so a
    cell is at least `target` pixels tall. col_labels: one text per column, written above it (the class of
    each column, large enough to read on a projector)."""
    n, c, h, w = images.shape
    scale = display_scale(h, target) if scale is None else scale
    nrow = (n + ncol - 1) // ncol
    cell_h, cell_w = h * scale, w * scale
    header = max(14, cell_h // 3) if col_labels else 0
    canvas = np.zeros((header + nrow * (cell_h + pad) + pad, ncol * (cell_w + pad) + pad, 3), dtype=np.uint8)
    canvas[:] = 40
    for i in range(n):
        tile = np.asarray(to_pil(images[i], scale).convert("RGB"))
        r, col = divmod(i, ncol)
        y, x = header + pad + r * (cell_h + pad), pad + col * (cell_w + pad)
        canvas[y:y + cell_h, x:x + cell_w] = tile
    grid = Image.fromarray(canvas)
    if col_labels:
        from PIL import ImageDraw, ImageFont

        draw = ImageDraw.Draw(grid)
        font = ImageFont.load_default(size=int(header * 0.75))
        for col, text in enumerate(col_labels[:ncol]):
            cx = pad + col * (cell_w + pad) + cell_w / 2
            draw.text((cx, pad + header / 2), str(text), fill=(235, 235, 235), font=font, anchor="mm")
    return grid


def save_images(images: torch.Tensor, names: list[str], out_dir: str | Path) -> list[Path]:
    """One PNG per image at the model's resolution; returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from quant.guards import write_bytes_atomic

    paths = []
    for image, name in zip(images, names):
        path = out_dir / f"{name}.png"
        write_bytes_atomic(path, png_bytes(to_pil(image)))  # a killed job never leaves a half-written PNG
        paths.append(path)
    return paths


def png_bytes(image) -> bytes:
    """A PIL image encoded as PNG."""
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def to_uint8_rgb(images: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] floats in [0, 1] (or uint8) -> [N, 3, H, W] uint8, the layout torch-fidelity expects."""
    if images.dtype != torch.uint8:
        images = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    images = images.cpu()
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [N, 1 or 3, H, W], got {tuple(images.shape)}")
    return images.contiguous()
