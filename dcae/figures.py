"""Image grids a reader understands without the console: a title above, a label left of each row."""
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .data import image_grid

PADDING = 2
FONT_SIZE = 12


def _font(size: int = FONT_SIZE):
    try:
        return ImageFont.load_default(size)
    except (TypeError, OSError):  # Pillow built without FreeType: its fixed bitmap font
        return ImageFont.load_default()


def labelled_grid(rows: list[torch.Tensor], labels: list[str], title: str = "") -> torch.Tensor:
    """rows: equal-shape (B, 3, H, W) tensors in [-1, 1] -> (3, H', W') in [-1, 1]: the rows side by side as in
    `image_grid`, each with its label written to its left (white background, black text), the title above."""
    if len(labels) != len(rows):
        raise ValueError(f"labelled_grid needs one label per row: {len(rows)} rows, {len(labels)} labels")
    grid = image_grid(rows, PADDING)
    pixels = ((grid.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    font = _font()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = lambda s: measure.textbbox((0, 0), s, font=font)[2] if s else 0  # noqa: E731
    left = max(text_w(label) for label in labels) + 2 * FONT_SIZE // 2
    top = FONT_SIZE * 2 if title else 0
    canvas = Image.new("RGB", (pixels.shape[1] + left, pixels.shape[0] + top), "white")
    canvas.paste(Image.fromarray(pixels), (left, top))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((FONT_SIZE // 2, FONT_SIZE // 2), title, fill="black", font=font)
    row_h = rows[0].shape[-2]
    for i, label in enumerate(labels):
        y = top + i * (row_h + PADDING) + row_h // 2 - FONT_SIZE // 2
        draw.text((FONT_SIZE // 2, y), label, fill="black", font=font)
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).float() / 127.5 - 1
