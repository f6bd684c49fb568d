"""Images in requests (image backbones): base64 strings or `data:image/...;base64,` URLs, as the OpenAI vision API
sends them, decoded with Pillow under limits and preprocessed with the backbone's image processor.

Limits: at most MAX_IMAGES per request (the schema), each at most `max_bytes` decoded, at most MAX_PIXELS pixels
(checked from the header, before any pixel is decoded: decompression bombs never expand), and a mode Pillow can
turn into RGB. Every refusal is a 400 naming the item and what was wrong.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from typing import Any

import torch

from .http_errors import BadRequest

MAX_IMAGES = 16
MAX_PIXELS = 4096 * 4096
_DATA_URL = re.compile(r"data:image/[a-zA-Z0-9.+-]+;base64,", re.ASCII)
_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "I;16", "I", "F"}


def decode_image(item: str, index: int, *, max_bytes: int) -> Any:
    """A PIL image (RGB) from one request item; BadRequest naming `images[index]` otherwise."""
    from PIL import Image, UnidentifiedImageError

    where = f"images[{index}]"
    raw = item[_DATA_URL.match(item).end() :] if _DATA_URL.match(item) else item
    if raw.startswith("data:"):
        raise BadRequest(f"{where}: expected base64 or a data:image/<type>;base64, URL, got {item[:40]!r}")
    if len(raw) > 4 * (max_bytes // 3 + 1):
        raise BadRequest(f"{where}: expected at most {max_bytes} bytes of image, got about {len(raw) * 3 // 4}")
    try:
        data = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{where}: not valid base64") from None
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise BadRequest(f"{where}: expected at most {MAX_PIXELS} pixels, got {w}x{h}")
            if img.mode not in _MODES:
                raise BadRequest(f"{where}: image mode {img.mode!r} cannot be read as RGB")
            img.load()
            return img.convert("RGB")
    except BadRequest:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError):
        raise BadRequest(f"{where}: not an image Pillow can read (PNG, JPEG, GIF, BMP, WebP, ...)") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
        raise BadRequest(f"{where}: the image is damaged or truncated ({e})") from None


def pixel_values(processor: Any, images: list[Any]) -> list[torch.Tensor]:
    """Each image as the backbone's processor prepares it: (C, H, W) float."""
    batch = processor(images=images, return_tensors="pt")["pixel_values"]  # (n, C, H, W)
    return list(batch)
