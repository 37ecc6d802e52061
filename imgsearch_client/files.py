"""Find image files under the paths given on the command line, in a stable order."""

import pathlib
from collections.abc import Iterable, Iterator

# Folders are searched for these suffixes; a file named explicitly is always taken, whatever its name,
# because the services read the format from the bytes.
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".avif", ".heic", ".heif"}
)


def find_images(paths: Iterable[str | pathlib.Path]) -> Iterator[pathlib.Path]:
    """Yield the files named in paths and the image files inside the folders named in paths.

    Raises FileNotFoundError for a path that does not exist.
    """
    for raw in paths:
        path = pathlib.Path(raw)
        if path.is_dir():
            yield from sorted(
                child for child in path.rglob("*") if child.is_file() and child.suffix.lower() in IMAGE_SUFFIXES
            )
        elif path.is_file():
            yield path
        else:
            raise FileNotFoundError(f"no such file or folder: {path}")
