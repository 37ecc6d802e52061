"""Unusual and broken image files through the real embed (tiny CLIP in ONNX Runtime) and index services."""

import io
import json
import pathlib
import subprocess
import sys

import grpc
import numpy as np
import pytest
from PIL import Image, ImageFile
from structlog.testing import capture_logs

from imgsearch.index.v1 import index_service_pb2
from imgsearch_client import cli
from imgsearch_common.exif import EXIF_HEADER
from imgsearch_common.fingerprints import pixel_sha256
from imgsearch_common.images import BACKGROUND_RGB, decode_rgb
from tests.integration.bad_input_services import (
    cosine,
    encode,
    noise_picture,
    scene_picture,
    start_embed,
    start_index,
)

pytestmark = pytest.mark.integration

ADDED = index_service_pb2.INGEST_STATUS_ADDED
ALREADY_PRESENT = index_service_pb2.INGEST_STATUS_ALREADY_PRESENT
FAILED = index_service_pb2.INGEST_STATUS_FAILED
_ORIENTATION_TAG = 0x0112
_MAX_PIXELS = 10_000_000


@pytest.fixture(scope="module")
def embed():
    service = start_embed("onnx")
    yield service
    service.stop()


@pytest.fixture(scope="module")
def index(embed, tmp_path_factory):
    service = start_index(embed.address, tmp_path_factory.mktemp("index"))
    yield service
    service.stop()


def _ingest_request(image: bytes, **fields) -> index_service_pb2.IngestImagesRequest:
    return index_service_pb2.IngestImagesRequest(image=image, **fields)


def _results(responses) -> list[str]:
    return [response.WhichOneof("result") for response in responses]


def _events(logs: list[dict], name: str) -> list[dict]:
    return [entry for entry in logs if entry["event"] == name]


def _assert_no_server_fault(code_names: list[str]) -> None:
    assert "UNKNOWN" not in code_names
    assert "INTERNAL" not in code_names


# EXIF


def _exif_jpeg(picture: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[_ORIENTATION_TAG] = orientation
    exif[0x010F] = "TestCam"  # Make, so that the IFD has more than one entry
    return encode(picture, "JPEG", quality=92, exif=exif.tobytes())


def _exif_segment_bounds(jpeg: bytes) -> tuple[int, int]:
    """Return where the EXIF APP1 segment of jpeg starts (its 0xFFE1 marker) and ends."""
    header = jpeg.index(EXIF_HEADER)
    start = header - 4
    return start, start + 2 + int.from_bytes(jpeg[start + 2 : start + 4], "big")


def _with_exif_twice(jpeg: bytes) -> bytes:
    start, end = _exif_segment_bounds(jpeg)
    return jpeg[:end] + jpeg[start:end] + jpeg[end:]


def _with_header_bytes_flipped(jpeg: bytes, seed: int) -> bytes:
    """Flip two random bytes of the 8-byte TIFF header (byte order, magic number, IFD0 offset) inside the APP1 segment."""
    rng = np.random.default_rng(seed)
    tiff_start = jpeg.index(EXIF_HEADER) + len(EXIF_HEADER)
    corrupted = bytearray(jpeg)
    for position in rng.choice(8, size=2, replace=False):
        corrupted[tiff_start + position] ^= int(rng.integers(1, 256))
    return bytes(corrupted)


def _with_ascii_orientation(jpeg: bytes) -> bytes:
    """Change the type of the Orientation entry from SHORT (3) to ASCII (2), keeping every length."""
    tiff_start = jpeg.index(EXIF_HEADER) + len(EXIF_HEADER)
    big_endian = jpeg[tiff_start : tiff_start + 2] == b"MM"
    entry = jpeg.index(b"\x01\x12\x00\x03" if big_endian else b"\x12\x01\x03\x00", tiff_start)
    type_field = entry + 2
    ascii_type = b"\x00\x02" if big_endian else b"\x02\x00"
    return jpeg[:type_field] + ascii_type + jpeg[type_field + 2 :]


_PICTURE = noise_picture(60, 40, seed=11, mode="L")
_MALFORMED_EXIF = {
    "orientation 9": _exif_jpeg(_PICTURE, 9),
    "orientation 0": _exif_jpeg(_PICTURE, 0),
    "orientation of type ASCII": _with_ascii_orientation(_exif_jpeg(_PICTURE, 6)),
    "EXIF written twice": _with_exif_twice(_exif_jpeg(_PICTURE, 6)),
    **{f"header bytes flipped, seed {seed}": _with_header_bytes_flipped(_exif_jpeg(_PICTURE, 6), seed) for seed in range(3)},
}


@pytest.mark.parametrize("case", list(_MALFORMED_EXIF))
def test_malformed_exif_keeps_stored_orientation(case, embed, index):
    image = _MALFORMED_EXIF[case]
    stored = pixel_sha256(Image.open(io.BytesIO(encode(_PICTURE, "JPEG", quality=92))).convert("RGB"))
    neighbours = [encode(scene_picture(50, 30, seed=12)), encode(scene_picture(30, 50, seed=13))]

    with capture_logs() as logs:
        responses = embed.embed([neighbours[0], image, neighbours[1]])
        [ingested] = index.ingest([_ingest_request(image)])

    assert _results(responses) == ["embedding"] * 3
    fingerprint = responses[1].fingerprint
    assert (fingerprint.width, fingerprint.height) == (60, 40)
    assert fingerprint.pixel_sha256 == stored
    warnings = _events(logs, "exif_orientation_ignored")
    assert warnings
    assert all(warning["log_level"] == "warning" for warning in warnings)
    assert ingested.status in (ADDED, ALREADY_PRESENT)
    [found] = index.search(item_id=ingested.item_id, k=1).neighbours
    assert (found.width, found.height) == (60, 40)


def test_orientation_on_l_image_applied(embed):
    image = _exif_jpeg(_PICTURE, 6)
    turned = Image.open(io.BytesIO(encode(_PICTURE, "JPEG", quality=92))).convert("RGB").transpose(
        Image.Transpose.ROTATE_270
    )

    with capture_logs() as logs:
        [response] = embed.embed([image])

    assert (response.fingerprint.width, response.fingerprint.height) == (40, 60)
    assert response.fingerprint.pixel_sha256 == pixel_sha256(turned)
    assert _events(logs, "exif_orientation_ignored") == []


# Colour modes


def test_cmyk_jpeg_close_to_rgb(embed):
    picture = scene_picture(96, 80, seed=14)
    rgb = encode(picture, "JPEG", quality=95)
    cmyk = encode(picture.convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(cmyk)).mode == "CMYK"

    responses = embed.embed([rgb, cmyk])

    assert _results(responses) == ["embedding", "embedding"]
    assert cosine(responses[0].embedding.values, responses[1].embedding.values) >= 0.98
    assert (responses[1].fingerprint.width, responses[1].fingerprint.height) == (96, 80)


def _transparent_variants() -> dict[str, bytes]:
    """Return one picture with transparent, half-transparent and opaque grey blocks as LA, RGBA and palette PNGs."""
    greys = np.array([0, 80, 160, 240], dtype=np.uint8)
    alphas = np.array([0, 128, 255], dtype=np.uint8)
    grey_index = np.repeat(np.arange(48)[:, np.newaxis] // 12 % 4, 48, axis=1)
    alpha_index = np.repeat(np.arange(48)[np.newaxis, :] // 16 % 3, 48, axis=0)
    grey, alpha = greys[grey_index], alphas[alpha_index]

    palette_picture = Image.fromarray((grey_index * 3 + alpha_index).astype(np.uint8), "P")
    palette_picture.putpalette([int(value) for value in greys for _ in alphas for _ in range(3)])
    palette_alphas = bytes(int(value) for _ in greys for value in alphas)
    return {
        "LA": encode(Image.fromarray(np.stack([grey, alpha], axis=-1), "LA")),
        "RGBA": encode(Image.fromarray(np.stack([grey, grey, grey, alpha], axis=-1), "RGBA")),
        "P": encode(palette_picture, transparency=palette_alphas),
    }


def test_transparency_composited_on_background(embed, index):
    variants = _transparent_variants()
    assert Image.open(io.BytesIO(variants["P"])).mode == "P"

    responses = embed.embed(list(variants.values()))
    ingested = index.ingest([_ingest_request(image, uri=mode) for mode, image in variants.items()])
    neighbours = index.search(image=variants["LA"], k=3).neighbours

    assert _results(responses) == ["embedding"] * 3
    assert len({response.fingerprint.pixel_sha256 for response in responses}) == 1
    for image in variants.values():
        picture = np.asarray(decode_rgb(image, _MAX_PIXELS))
        assert picture[0, 0].tolist() == list(BACKGROUND_RGB)  # a fully transparent pixel
        assert picture[0, 47].tolist() == [0, 0, 0]  # an opaque black one
    vectors = [response.embedding.values for response in responses]
    assert min(cosine(vectors[0], other) for other in vectors[1:]) >= 0.9999
    assert [response.status for response in ingested] == [ADDED, ALREADY_PRESENT, ALREADY_PRESENT]
    assert {response.duplicate_of_item_id for response in ingested[1:]} == {ingested[0].item_id}
    assert {response.duplicate_match for response in ingested[1:]} == {index_service_pb2.MATCH_KIND_EXACT}
    assert neighbours[0].item_id == ingested[0].item_id
    assert neighbours[0].match == index_service_pb2.MATCH_KIND_EXACT


def test_tiny_images_embedded(embed, index):
    tiny = {
        "1x1 L": encode(Image.new("L", (1, 1), 90)),
        "1x1 P": encode(Image.new("P", (1, 1), 3)),
        "3x3 L": encode(noise_picture(3, 3, seed=15, mode="L")),
        "3x3 P": encode(noise_picture(3, 3, seed=16).convert("P")),
    }
    normal = encode(scene_picture(64, 48, seed=17))

    responses = embed.embed(list(tiny.values()) + [normal])
    ingested = index.ingest([_ingest_request(image, uri=name) for name, image in tiny.items()])
    [later] = embed.embed([encode(scene_picture(48, 64, seed=18))])

    assert _results(responses) == ["embedding"] * 5
    sizes = [(response.fingerprint.width, response.fingerprint.height) for response in responses]
    assert sizes == [(1, 1), (1, 1), (3, 3), (3, 3), (64, 48)]
    assert all(np.all(np.isfinite(response.embedding.values)) for response in responses)
    assert FAILED not in [response.status for response in ingested]
    assert later.WhichOneof("result") == "embedding"


# Truncated and non-image bytes


def test_truncated_jpeg_fails_alone(embed, index):
    jpeg = encode(scene_picture(200, 150, seed=19), "JPEG", quality=90)
    truncated = {"60 percent": jpeg[: len(jpeg) * 6 // 10], "first 200 bytes": jpeg[:200]}
    good = [encode(scene_picture(40, 40, seed=20)), encode(scene_picture(40, 40, seed=21))]

    responses = embed.embed([good[0], *truncated.values(), good[1]])
    ingested = index.ingest([_ingest_request(image) for image in [good[0], *truncated.values(), good[1]]])

    assert _results(responses) == ["embedding", "error", "error", "embedding"]
    for response in (*responses[1:3], *ingested[1:3]):
        assert response.error.code_name == "INVALID_ARGUMENT"
        assert "JPEG" in response.error.message
        assert "truncated" in response.error.message
    assert [response.status for response in ingested] == [ADDED, FAILED, FAILED, ADDED]
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize(
    ("image", "message_part"),
    [
        (b"", "empty"),
        (b"\xff", "not recognised"),
        (b"The quick brown fox; plain text, not an image.\n", "not recognised"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 2000, "JPEG image header could not be read"),
    ],
    ids=["empty", "one byte", "plain text", "JPEG header then zeros"],
)
def test_not_an_image_invalid_argument(image, message_part, embed, index):
    good = encode(scene_picture(40, 30, seed=22))

    responses = embed.embed([image, good])
    ingested = index.ingest([_ingest_request(image), _ingest_request(good)])

    assert _results(responses) == ["error", "embedding"]
    for failure in (responses[0].error, ingested[0].error):
        assert failure.code_name == "INVALID_ARGUMENT"
        assert failure.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert message_part in failure.message
    assert ingested[0].status == FAILED
    assert ingested[1].status in (ADDED, ALREADY_PRESENT)


# Formats


def _modern_formats() -> dict[str, bytes]:
    picture = scene_picture(120, 90, seed=23)
    return {name: encode(picture, name, quality=90) for name in ("WEBP", "AVIF", "HEIF")}


def test_modern_formats_embedded(embed):
    formats = _modern_formats()
    png = encode(scene_picture(120, 90, seed=23))

    responses = embed.embed([png, *formats.values()])

    assert _results(responses) == ["embedding"] * 4
    for response in responses[1:]:
        assert (response.fingerprint.width, response.fingerprint.height) == (120, 90)
        assert cosine(responses[0].embedding.values, response.embedding.values) >= 0.95


@pytest.mark.parametrize("image_format", ["WEBP", "AVIF", "HEIF"])
def test_truncated_modern_format_names_it(image_format, embed, index):
    image = _modern_formats()[image_format]
    truncated = [image[: len(image) // 2], image[:200]]

    responses = embed.embed(truncated)
    ingested = index.ingest([_ingest_request(image) for image in truncated])

    for failure in [response.error for response in responses] + [response.error for response in ingested]:
        assert failure.code_name == "INVALID_ARGUMENT"
        assert image_format in failure.message
        assert "truncated or corrupt" in failure.message


def _unsupported_images() -> dict[str, bytes]:
    return {
        "ICO": encode(scene_picture(32, 32, seed=24), "ICO"),
        "PDF": b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj\n%%EOF\n",
        "SVG": b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="4" height="4"/>\n',
        "JPEG XL": b"\xff\x0a" + bytes(64),
    }


@pytest.mark.parametrize("image_format", list(_unsupported_images()))
def test_unsupported_format_names_it(image_format, embed, index):
    image = _unsupported_images()[image_format]

    [response] = embed.embed([image])
    [ingested] = index.ingest([_ingest_request(image)])

    for failure in (response.error, ingested.error):
        assert failure.code_name == "INVALID_ARGUMENT"
        assert f"image format {image_format} is not supported" in failure.message
        assert "JPEG, PNG" in failure.message


def test_cli_reads_format_from_bytes(index, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "webp_named.jpg").write_bytes(_modern_formats()["WEBP"])
    (folder / "icon_named.png").write_bytes(_unsupported_images()["ICO"])
    (folder / "real.png").write_bytes(encode(scene_picture(70, 50, seed=25)))

    first_code = cli.main(["ingest", "--addr", index.address, "--json", str(folder)])
    first = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    second_code = cli.main(["ingest", "--addr", index.address, "--json", str(folder)])
    second = [json.loads(line) for line in capsys.readouterr().out.splitlines()]

    assert (first_code, second_code) == (1, 1)
    by_name = {pathlib.Path(line["uri"]).name: line for line in first[:-1]}
    assert len(first) == 4  # one line per file, so no file was sent twice, and the summary
    assert by_name["webp_named.jpg"]["status"] == "added"
    assert by_name["real.png"]["status"] == "added"
    assert by_name["icon_named.png"]["error"]["code"] == "INVALID_ARGUMENT"
    assert "image format ICO is not supported" in by_name["icon_named.png"]["error"]["message"]
    assert first[-1] == {"summary": True, "total": 3, "added": 2, "already_present": 0, "failed": 1}
    assert second[-1] == {"summary": True, "total": 3, "added": 0, "already_present": 2, "failed": 1}


# Batches


def test_batch_position_keeps_embedding(embed, index):
    image = encode(scene_picture(80, 64, seed=26), "JPEG", quality=90)
    others = [encode(scene_picture(64, 80, seed=27 + number)) for number in range(7)]

    [alone] = embed.embed([image])
    in_eight = embed.embed(others[:3] + [image] + others[3:])
    sixteen_copies = embed.embed([image] * 16)

    vectors = [alone.embedding.values, in_eight[3].embedding.values]
    vectors += [response.embedding.values for response in sixteen_copies]
    assert _results(in_eight + sixteen_copies) == ["embedding"] * 24
    assert min(cosine(vectors[0], vector) for vector in vectors[1:]) >= 0.999
    [ingested] = index.ingest([_ingest_request(image)])
    top = index.search(image=image, k=1).neighbours[0]
    assert top.item_id == ingested.item_id
    assert 0.999 <= top.score <= 1.0
    _assert_no_server_fault([response.error.code_name for response in in_eight + sixteen_copies])


# Decompression bombs

# Runs in a fresh process, so that ru_maxrss (the peak resident memory) starts low and measures only
# these calls. It starts both services, sends each bomb to each, and prints the outcomes as JSON.
_BOMB_SCRIPT = """
import json, pathlib, resource, sys, tempfile
from imgsearch.index.v1 import index_service_pb2
from imgsearch_common.logs import configure_logging
from tests.integration.bad_input_services import black_bilevel_png, encode, scene_picture, start_embed, start_index

configure_logging("warning", json=True)
embed = start_embed("hash")
index = start_index(embed.address, pathlib.Path(tempfile.mkdtemp()))
good = encode(scene_picture(64, 64, seed=1))
embed.embed([good])
index.ingest([index_service_pb2.IngestImagesRequest(image=good)])
outcomes = {}
for side in map(int, sys.argv[1:]):
    bomb = black_bilevel_png(side, side)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    embedded = embed.embed([bomb, good])
    ingested = index.ingest([index_service_pb2.IngestImagesRequest(image=bomb)])
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    outcomes[side] = {
        "bytes": len(bomb),
        "peak_growth_kib": after - before,
        "errors": [embedded[0].error.code_name, ingested[0].error.code_name],
        "messages": [embedded[0].error.message, ingested[0].error.message],
        "good_after": embedded[1].WhichOneof("result"),
    }
index.stop()
embed.stop()
print(json.dumps(outcomes))
"""


def test_decompression_bomb_rejected_before_decode():
    repository = pathlib.Path(__file__).resolve().parents[2]
    completed = subprocess.run(
        [sys.executable, "-c", _BOMB_SCRIPT, "20000", "8000"],
        cwd=repository,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    outcomes = json.loads(completed.stdout)

    # 20000x20000 is above Pillow's own limit; 8000x8000 (64M pixels) only above the services' 50M default.
    for side, limit_text in (("20000", "the limit is 50000000 pixels"), ("8000", "above the limit of 50000000")):
        outcome = outcomes[side]
        assert outcome["bytes"] < 100_000
        assert outcome["errors"] == ["RESOURCE_EXHAUSTED", "RESOURCE_EXHAUSTED"]
        assert all(limit_text in message for message in outcome["messages"])
        assert outcome["good_after"] == "embedding"
        # Pillow would hold a decoded bilevel image as a byte per pixel: 400 MB and 64 MB.
        assert outcome["peak_growth_kib"] < 16 * 1024
