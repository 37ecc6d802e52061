"""CLIP image preprocessing in Pillow and numpy, matching the torchvision transform of openai/CLIP."""

import numpy as np
from PIL import Image

# Side in pixels of the square input of the CLIP ViT-B/32 visual model.
INPUT_SIZE = 224

# Per-channel RGB statistics of the CLIP training images, from openai/CLIP clip/clip.py.
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def preprocess(image: Image.Image, size: int = INPUT_SIZE) -> np.ndarray:
    """Turn an RGB picture into one normalised CLIP input of shape (1, 3, size, size), float32.

    The steps are those of openai/CLIP's `_transform`: bicubic resize of the shortest side to
    `size`, centre crop to size x size, scale to [0, 1], subtract CLIP_MEAN, divide by CLIP_STD.
    """
    if image.mode != "RGB":
        raise ValueError(
            f"preprocess expects an RGB picture, got mode {image.mode}. Decode images with decode_rgb"
        )

    cropped = centre_crop(resize_shortest_side(image, size), size)

    pixels = np.asarray(cropped, dtype=np.float32) / np.float32(255)
    normalised = (pixels - CLIP_MEAN) / CLIP_STD
    return np.ascontiguousarray(normalised.transpose(2, 0, 1)[np.newaxis])


def resize_shortest_side(image: Image.Image, size: int) -> Image.Image:
    """Resize with bicubic filtering so that the shorter side is `size`, keeping the aspect ratio.

    The longer side becomes int(size * long / short), truncated like torchvision's Resize(int).
    """
    width, height = image.size
    if width <= height:
        new_size = (size, int(size * height / width))
    else:
        new_size = (int(size * width / height), size)
    if new_size == image.size:
        return image
    return image.resize(new_size, Image.Resampling.BICUBIC)


def centre_crop(image: Image.Image, size: int) -> Image.Image:
    """Cut the central size x size square, rounding offsets like torchvision's CenterCrop.

    The picture must be at least `size` pixels on both sides, as after resize_shortest_side.
    """
    width, height = image.size
    if width < size or height < size:
        raise ValueError(f"centre_crop needs at least {size}x{size} pixels, got {width}x{height}")
    # Python's round() rounds halves to even, as torchvision does, so odd margins match.
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return image.crop((left, top, left + size, top + size))
