"""Labelled PNG grids of samples (what users look at in MLflow and DVC)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from tlcm.core.storage import atomic_write_bytes


def grid_image(rows: list[tuple[str, np.ndarray]], scale: int = 3, label_width: int = 150) -> Image.Image:
    """``rows``: (label, uint8 images (N, H, W, 3)); one labelled row per entry."""
    n = max(len(imgs) for _, imgs in rows)
    h, w = rows[0][1].shape[1:3]
    H, Wd = h * scale, w * scale
    canvas = Image.new("RGB", (label_width + n * (Wd + 2), len(rows) * (H + 2)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, (label, imgs) in enumerate(rows):
        y = r * (H + 2)
        draw.text((4, y + H // 2 - 6), label, fill=(0, 0, 0))
        for i, im in enumerate(imgs):
            canvas.paste(Image.fromarray(im).resize((Wd, H), Image.Resampling.NEAREST), (label_width + i * (Wd + 2), y))
    return canvas


def save_grid(rows: list[tuple[str, np.ndarray]], path: str | Path, **kw) -> Path:
    import io

    buf = io.BytesIO()
    grid_image(rows, **kw).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)
