"""The demo end to end in child processes: two services, ingest twice, search, JSON and grid written."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

pytestmark = [pytest.mark.integration, pytest.mark.slow]

_REPO = pathlib.Path(__file__).resolve().parents[2]


def _write_photos(folder: pathlib.Path, count: int) -> list[pathlib.Path]:
    rng = np.random.default_rng(7)
    paths = []
    for number in range(count):
        pixels = rng.integers(0, 256, size=(240, 320, 3), dtype=np.uint8)
        path = folder / f"{number:012d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def test_demo_finds_query_first_and_writes_outputs(tmp_path):
    dataset = tmp_path / "images"
    dataset.mkdir()
    photos = _write_photos(dataset, 6)
    out = tmp_path / "out"

    finished = subprocess.run(
        [sys.executable, "-m", "imgsearch_client.demo", "--dataset", str(dataset), "--out", str(out),
         "--model-dir", str(_REPO / "models" / "tiny-clip-random"), "-k", "3"],
        cwd=_REPO, capture_output=True, text=True, timeout=240,
    )

    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert "NOT semantically meaningful" in finished.stdout
    assert "second pass: {'added': 0, 'already_present': 6, 'failed': 0}" in finished.stdout
    result = json.loads((out / "search.json").read_text())
    neighbours = result["neighbours"]
    assert len(neighbours) == 3
    assert neighbours[0]["uri"] == str(photos[0].resolve())
    assert neighbours[0]["score"] >= 0.999
    assert neighbours[1]["score"] < neighbours[0]["score"]
    with Image.open(out / "grid.png") as grid:
        assert grid.width > 4 * 224
