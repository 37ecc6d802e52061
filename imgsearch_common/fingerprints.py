"""Model-free content signals of a picture: a pixel hash, a perceptual hash and a layout for local differences.

Exact duplicates share pixel_sha256. Near duplicates have a small pHash distance and a small local
difference: the layout contains 32x32 colour thumbnails of the picture's centre at a few crop scales,
and the local difference is the mean colour difference of the most different 4x4 window after the
two thumbnails are aligned (best crop scale) and their colour histograms matched. Histogram matching
cancels global brightness and contrast changes, and the window finds a moved or recoloured object
that a global hash averages away.
"""

import dataclasses
import hashlib
import struct

import imagehash
import numpy as np
from PIL import Image

FINGERPRINT_VERSION = 1

# Centre crops, as the factor by which each side shrinks, that align lightly cropped copies.
_LAYOUT_SCALES = (1.0, 1.05, 1.10)
_THUMBNAIL_SIDE = 32
_WINDOW = 4
# Pictures are first reduced to at most this side, so a huge picture costs no more than a small one.
_WORKING_SIDE = 384
# The floor of the standard deviation that differences are divided by, in 8-bit levels, so that a
# nearly flat picture does not turn small noise into large differences.
_MIN_STD = 8.0
_LAYOUT_SHAPE = (len(_LAYOUT_SCALES), _THUMBNAIL_SIDE, _THUMBNAIL_SIDE, 3)
LAYOUT_BYTES = int(np.prod(_LAYOUT_SHAPE))


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    """The content signals of one picture; see the module docstring."""

    version: int
    pixel_sha256: str
    phash: int
    width: int
    height: int
    layout: bytes


@dataclasses.dataclass(frozen=True)
class PerceptualDistance:
    """How far apart two fingerprints are: pHash bits that differ, and the local difference."""

    phash_distance: int
    local_difference: float


def compute_fingerprint(picture: Image.Image) -> Fingerprint:
    """Compute the fingerprint of an 8-bit RGB picture, already oriented as displayed."""
    if picture.mode != "RGB":
        raise ValueError(f"expected an RGB picture, got mode {picture.mode}")
    return Fingerprint(
        version=FINGERPRINT_VERSION,
        pixel_sha256=pixel_sha256(picture),
        phash=int(str(imagehash.phash(picture)), 16),
        width=picture.width,
        height=picture.height,
        layout=_layout(picture),
    )


def pixel_sha256(picture: Image.Image) -> str:
    """Return the hex SHA-256 of the picture's mode, size and raw pixels."""
    digest = hashlib.sha256()
    digest.update(picture.mode.encode("ascii"))
    digest.update(struct.pack(">II", picture.width, picture.height))
    digest.update(picture.tobytes())
    return digest.hexdigest()


def phash_distance(first: int, second: int) -> int:
    """Return the number of bits in which two 64-bit pHashes differ."""
    return (first ^ second).bit_count()


def compare(first: Fingerprint, second: Fingerprint) -> PerceptualDistance:
    """Measure how far apart two fingerprints of the same version are."""
    if first.version != second.version:
        raise ValueError(f"cannot compare fingerprint versions {first.version} and {second.version}")
    return PerceptualDistance(
        phash_distance=phash_distance(first.phash, second.phash),
        local_difference=local_difference(first.layout, second.layout),
    )


def local_difference(first_layout: bytes, second_layout: bytes) -> float:
    """Return the smallest, over the crop alignments, symmetric local difference of two layouts."""
    first = _layout_array(first_layout)
    second = _layout_array(second_layout)
    best = _symmetric_difference(first[0], second[0])
    for scale in range(1, len(_LAYOUT_SCALES)):
        best = min(
            best,
            _symmetric_difference(first[scale], second[0]),
            _symmetric_difference(first[0], second[scale]),
        )
    return best


def local_differences(first_layouts: list[bytes], second_layouts: list[bytes]) -> np.ndarray:
    """Return local_difference(first, second) of each pair of layouts, computed for all pairs at once.

    Equal to calling local_difference on each pair (within float rounding) and, for 2,000 pairs,
    about 3.5 times faster on a 2-core x86 VM, because each distinct layout is sorted once and the
    pairs share numpy calls.
    """
    if len(first_layouts) != len(second_layouts):
        raise ValueError(f"got {len(first_layouts)} first layouts but {len(second_layouts)} second layouts")
    if not first_layouts:
        return np.zeros(0, dtype=np.float64)
    distinct = list(dict.fromkeys(first_layouts + second_layouts))
    position = {layout: index for index, layout in enumerate(distinct)}
    prepared = _PreparedLayouts(np.stack([_layout_array(layout) for layout in distinct]))
    firsts = np.array([position[layout] for layout in first_layouts])
    seconds = np.array([position[layout] for layout in second_layouts])

    best = prepared.symmetric(firsts, 0, seconds, 0)
    for scale in range(1, len(_LAYOUT_SCALES)):
        best = np.minimum(best, prepared.symmetric(firsts, scale, seconds, 0))
        best = np.minimum(best, prepared.symmetric(firsts, 0, seconds, scale))
    return best


class _PreparedLayouts:
    """Layouts with their per-channel sorted values and ranks, so that histogram matching is one scatter."""

    def __init__(self, layouts: np.ndarray):
        count, scales = layouts.shape[:2]
        self._pixels = layouts.reshape(count, scales, -1, 3)
        self._ranks = np.argsort(self._pixels, axis=2, kind="stable")
        self._sorted = np.take_along_axis(self._pixels, self._ranks, axis=2)
        self._std = np.maximum(self._pixels.reshape(count, scales, -1).std(axis=2), _MIN_STD)

    def symmetric(self, firsts: np.ndarray, first_scale: int, seconds: np.ndarray, second_scale: int) -> np.ndarray:
        return 0.5 * (
            self._window(firsts, first_scale, seconds, second_scale)
            + self._window(seconds, second_scale, firsts, first_scale)
        )

    def _window(self, references: np.ndarray, reference_scale: int, others: np.ndarray, other_scale: int):
        """Compute _window_difference for many pairs: others matched to references' histograms."""
        matched = np.empty_like(self._pixels[others, other_scale])
        np.put_along_axis(matched, self._ranks[others, other_scale], self._sorted[references, reference_scale], axis=1)
        difference = np.abs(self._pixels[references, reference_scale] - matched).mean(axis=2)
        difference /= self._std[references, reference_scale][:, np.newaxis]
        side = _THUMBNAIL_SIDE
        windows = _window_means_batch(difference.reshape(-1, side, side), _WINDOW)
        return windows.reshape(len(references), -1).max(axis=1)


def _window_means_batch(values: np.ndarray, window: int) -> np.ndarray:
    """_window_means over the last two axes of a stack of arrays."""
    table = np.pad(values, ((0, 0), (1, 0), (1, 0))).cumsum(axis=1).cumsum(axis=2)
    sums = (
        table[:, window:, window:] - table[:, :-window, window:]
        - table[:, window:, :-window] + table[:, :-window, :-window]
    )
    return sums / (window * window)


def _layout(picture: Image.Image) -> bytes:
    working = picture.copy()
    working.thumbnail((_WORKING_SIDE, _WORKING_SIDE), Image.Resampling.BOX)
    width, height = working.size
    thumbnails = []
    for scale in _LAYOUT_SCALES:
        crop_width, crop_height = width / scale, height / scale
        left, top = (width - crop_width) / 2, (height - crop_height) / 2
        box = (left, top, left + crop_width, top + crop_height)
        side = (_THUMBNAIL_SIDE, _THUMBNAIL_SIDE)
        thumbnails.append(np.asarray(working.resize(side, Image.Resampling.BOX, box=box), dtype=np.uint8))
    return np.stack(thumbnails).tobytes()


def _layout_array(layout: bytes) -> np.ndarray:
    if len(layout) != LAYOUT_BYTES:
        raise ValueError(f"layout has {len(layout)} bytes, expected {LAYOUT_BYTES}")
    return np.frombuffer(layout, dtype=np.uint8).reshape(_LAYOUT_SHAPE).astype(np.float32)


def _symmetric_difference(first: np.ndarray, second: np.ndarray) -> float:
    return 0.5 * (_window_difference(first, second) + _window_difference(second, first))


def _window_difference(reference: np.ndarray, other: np.ndarray) -> float:
    """Return the largest mean difference over 4x4 windows after matching other's histograms to reference's."""
    matched = _match_histograms(other, reference)
    difference = np.abs(reference - matched).mean(axis=2) / max(float(reference.std()), _MIN_STD)
    return float(_window_means(difference, _WINDOW).max())


def _match_histograms(source: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Give each channel of source the sorted values of reference's channel, in source's rank order."""
    matched = np.empty_like(source)
    for channel in range(source.shape[2]):
        values = source[:, :, channel].ravel()
        ranks = np.argsort(values, kind="stable")
        mapped = np.empty_like(values)
        mapped[ranks] = np.sort(reference[:, :, channel].ravel())
        matched[:, :, channel] = mapped.reshape(source.shape[:2])
    return matched


def _window_means(values: np.ndarray, window: int) -> np.ndarray:
    """Return the mean of every window x window square of values (stride 1), from a summed-area table."""
    table = np.pad(values, ((1, 0), (1, 0))).cumsum(axis=0).cumsum(axis=1)
    sums = table[window:, window:] - table[:-window, window:] - table[window:, :-window] + table[:-window, :-window]
    return sums / (window * window)
