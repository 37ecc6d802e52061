"""Find COCO128 for the demo, downloading its public release zip where no local copy exists."""

import pathlib
import tempfile
import zipfile

import requests
import structlog

from imgsearch_common.images import decode_rgb

log = structlog.get_logger(__name__)

COCO128_URL = "https://github.com/ultralytics/assets/releases/download/v0.0.0/coco128.zip"
COCO128_IMAGE_COUNT = 128
_IMAGES_INSIDE_ZIP = pathlib.Path("coco128/images/train2017")
_MAX_PIXELS = 50_000_000


class DatasetError(Exception):
    """The dataset is missing, incomplete or could not be downloaded."""


def locate_coco128(dataset: str, cache_dir: pathlib.Path, url: str = COCO128_URL) -> pathlib.Path:
    """Return the folder of COCO128 images: dataset when given, else a checked download in cache_dir."""
    if dataset:
        folder = pathlib.Path(dataset)
        if not folder.is_dir():
            raise DatasetError(f"dataset folder not found: {folder}")
        return folder
    folder = cache_dir / _IMAGES_INSIDE_ZIP
    if not folder.is_dir():
        _download_and_extract(url, cache_dir)
    check_coco128(folder)
    return folder


def check_coco128(folder: pathlib.Path) -> None:
    """Check that folder contains 128 JPEG files that decode."""
    images = sorted(folder.glob("*.jpg"))
    if len(images) != COCO128_IMAGE_COUNT:
        raise DatasetError(f"{folder} contains {len(images)} .jpg files, expected {COCO128_IMAGE_COUNT}")
    for path in images:
        decode_rgb(path.read_bytes(), _MAX_PIXELS)


def _download_and_extract(url: str, cache_dir: pathlib.Path, timeout_s: float = 60.0) -> None:
    cache_dir.mkdir(parents=True, exist_ok=True)
    log.info("dataset_download_started", url=url)
    with tempfile.TemporaryFile() as archive:
        try:
            with requests.get(url, stream=True, timeout=timeout_s) as response:
                if response.status_code != 200:
                    raise DatasetError(f"download of {url} failed with HTTP {response.status_code}")
                for chunk in response.iter_content(chunk_size=1 << 20):
                    archive.write(chunk)
        except requests.RequestException as error:
            raise DatasetError(f"download of {url} failed: {error}") from error
        archive.seek(0)
        try:
            with zipfile.ZipFile(archive) as contents:
                contents.extractall(cache_dir)
        except zipfile.BadZipFile as error:
            raise DatasetError(f"download of {url} is not a valid zip file: {error}") from error
    log.info("dataset_download_finished", folder=str(cache_dir))
