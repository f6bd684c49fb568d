"""Images in requests (image backbones): base64 strings or `data:image/...;base64,` URLs, as the OpenAI vision API
sends them, decoded with Pillow under limits and preprocessed with the backbone's image processor.

Limits: at most MAX_IMAGES per request (the schema), each at most `max_bytes` encoded, at most MAX_SIDE pixels a
side and MAX_PIXELS pixels, at most MAX_REQUEST_PIXELS pixels over the request's images, and a mode Pillow can turn
into RGB. Sides and pixels are checked from the header, before any pixel is decoded, so neither a decompression
bomb nor a 1 x 16,777,216 strip expands, and a request decodes at most MAX_REQUEST_PIXELS * 4 bytes. (Images are
decoded at full size: a reduced-scale JPEG decode would change what the image processor computes.) Every refusal
is a 400 naming the item and what was wrong.
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
MAX_SIDE = 4096
MAX_PIXELS = 4096 * 4096
MAX_REQUEST_PIXELS = 4096 * 4096  # over a request's images: at most 48 MiB of RGB decoded per request
_DATA_URL = re.compile(r"data:image/[a-zA-Z0-9.+-]+;base64,", re.ASCII)
_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "I;16", "I", "F"}


def decode_images(items: list[str], *, max_bytes: int) -> list[Any]:
    """The request's images (RGB). Every image's header is read and checked first (sides, pixels, the request's
    pixel budget), so a request over its limits is refused before any of its pixels is decoded."""
    opened, left = [], MAX_REQUEST_PIXELS
    try:
        for i, item in enumerate(items):
            img = open_image(item, i, max_bytes=max_bytes, pixels_left=left)
            left -= img.width * img.height
            opened.append(img)
        return [_load(img, i) for i, img in enumerate(opened)]
    finally:
        for img in opened:
            img.close()


def open_image(item: str, index: int, *, max_bytes: int, pixels_left: int = MAX_REQUEST_PIXELS) -> Any:
    """A PIL image of one request item with only its header read, checked against the limits; BadRequest naming
    `images[index]` otherwise."""
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
        img = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, Image.DecompressionBombError):
        raise BadRequest(f"{where}: not an image Pillow can read (PNG, JPEG, GIF, BMP, WebP, ...)") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
        raise BadRequest(f"{where}: the image is damaged or truncated ({e})") from None
    w, h = img.size
    problem = None
    if w > MAX_SIDE or h > MAX_SIDE:
        problem = f"expected at most {MAX_SIDE} pixels a side, got {w}x{h}"
    elif w * h > MAX_PIXELS:
        problem = f"expected at most {MAX_PIXELS} pixels, got {w}x{h}"
    elif w * h > pixels_left:
        problem = (
            f"the request's images may have {MAX_REQUEST_PIXELS} pixels in all; this one ({w}x{h}) would pass that"
        )
    elif img.mode not in _MODES:
        problem = f"image mode {img.mode!r} cannot be read as RGB"
    if problem is not None:
        img.close()
        raise BadRequest(f"{where}: {problem}")
    return img


def _load(img: Any, index: int) -> Any:
    from PIL import Image

    try:
        img.load()
        return img.convert("RGB")
    except Image.DecompressionBombError:
        raise BadRequest(f"images[{index}]: not an image Pillow can read (PNG, JPEG, GIF, BMP, WebP, ...)") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
        raise BadRequest(f"images[{index}]: the image is damaged or truncated ({e})") from None


def pixel_values(processor: Any, images: list[Any]) -> list[torch.Tensor]:
    """Each image as the backbone's processor prepares it: (C, H, W) float."""
    batch = processor(images=images, return_tensors="pt")["pixel_values"]  # (n, C, H, W)
    return list(batch)
