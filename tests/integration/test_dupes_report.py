"""`imgsearch dupes`: its HTML report in headless Chromium, and its output against the real services."""

import base64
import dataclasses
import html.parser
import io
import json
import pathlib
import shutil
import subprocess

import grpc
import numpy as np
import pytest
from PIL import Image, ImageDraw

from embed_service import config as embed_config
from embed_service import server as embed_server
from imgsearch.index.v1 import index_service_pb2 as pb
from imgsearch.index.v1 import index_service_pb2_grpc
from imgsearch_client import cli
from index_service import config as index_config
from index_service import server as index_server
from tests.fakes.images import encode
from tests.unit.imgsearch_client.dupes_fakes import FakeIndexService, canned_stream, running, write_photos

pytestmark = pytest.mark.integration

_MODEL_DIR = pathlib.Path(__file__).resolve().parents[2] / "models" / "tiny-clip-random"
_CHROMIUM = pathlib.Path("/usr/bin/chromium")
_SCREENSHOT = pathlib.Path(__file__).resolve().parents[2] / "test-output" / "dupes-report.png"
_WINDOW = (1280, 900)
# Only a hung browser reaches this limit, because Chromium starts in about a second (measured on a 2-core VM).
_CHROMIUM_TIMEOUT_S = 120
_EXACT_COLOUR = (0xC0, 0x39, 0x2B)

# Appended to a copy of the report: once every image has loaded, record each one's decoded width in the DOM.
_PROBE = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  for (const image of images) image.dataset.naturalWidth = String(image.naturalWidth);
  document.body.dataset.decodedImages = String(images.filter((image) => image.naturalWidth > 0).length);
});
</script>
"""

needs_chromium = pytest.mark.skipif(
    not _CHROMIUM.exists(),
    reason="/usr/bin/chromium is missing; install it with: apt-get install -y chromium chromium-driver",
)


def _run_chromium(profile: pathlib.Path, *arguments: str) -> subprocess.CompletedProcess:
    """Run headless Chromium with a new empty profile and no network features, and fail when it exits non-zero."""
    command = [
        str(_CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", *arguments,
    ]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=_CHROMIUM_TIMEOUT_S, check=False)
    assert finished.returncode == 0, f"chromium exited {finished.returncode}: {finished.stderr[-2000:]}"
    return finished


class _DomParser(html.parser.HTMLParser):
    """Collects groups, members and images of a dumped DOM."""

    def __init__(self):
        super().__init__()
        self.groups: list[tuple[str, str]] = []
        self.member_ids: list[str] = []
        self.images: list[dict[str, str]] = []
        self.body: dict[str, str] = {}

    def handle_starttag(self, tag, attrs):
        attributes = {name: value or "" for name, value in attrs}
        classes = attributes.get("class", "").split()
        if tag == "body":
            self.body = attributes
        if tag == "img":
            self.images.append(attributes)
        if "group" in classes:
            self.groups.append((attributes["id"], attributes["data-kind"]))
        if "member" in classes:
            self.member_ids.append(attributes["data-item-id"])


@pytest.fixture
def report_file(tmp_path) -> pathlib.Path:
    """Write the report of the canned groups, with real image files behind five of the six members."""
    paths = write_photos(tmp_path / "photos")
    out = tmp_path / "report.html"
    with running(FakeIndexService(canned_stream(paths))) as addr:
        assert cli.main(["dupes", "--addr", addr, "--html", str(out)]) == 0
    return out


@needs_chromium
def test_report_dom_has_every_member_and_decoded_image(report_file, tmp_path):
    probed = tmp_path / "probed.html"
    probed.write_text(report_file.read_text(encoding="utf-8").replace("</body>", _PROBE + "</body>"), encoding="utf-8")

    dumped = _run_chromium(tmp_path / "profile", "--virtual-time-budget=5000", "--dump-dom", probed.as_uri())

    dom = _DomParser()
    dom.feed(dumped.stdout)
    assert dom.groups == [("group-1", "exact"), ("group-2", "near"), ("group-3", "similar")]
    assert dom.member_ids == ["a1", "a2", "b1", "b2", "c1", "remote-7"]
    assert len(dom.images) == 5
    assert dom.body.get("data-decoded-images") == "5"
    for image in dom.images:
        assert image["src"].startswith("data:image/jpeg;base64,")
        assert int(image["data-natural-width"]) > 0
        with Image.open(io.BytesIO(base64.b64decode(image["src"].split(",", 1)[1]))) as thumbnail:
            assert max(thumbnail.size) <= 160


@needs_chromium
def test_report_screenshot_shows_coloured_groups(report_file, tmp_path):
    shot = tmp_path / "shot.png"

    _run_chromium(tmp_path / "profile", f"--screenshot={shot}", f"--window-size={_WINDOW[0]},{_WINDOW[1]}",
                  report_file.as_uri())

    with Image.open(shot) as picture:
        assert picture.size == _WINDOW
        rgb = picture.convert("RGB")
    # The exact group's left border is a solid band of its kind colour.
    exact_pixels = sum(
        count for count, colour in rgb.getcolors(maxcolors=_WINDOW[0] * _WINDOW[1])
        if all(abs(channel - expected) <= 3 for channel, expected in zip(colour, _EXACT_COLOUR))
    )
    assert exact_pixels > 1000
    _SCREENSHOT.parent.mkdir(exist_ok=True)
    shutil.copyfile(shot, _SCREENSHOT)


def _scene(seed: int) -> Image.Image:
    """Draw a seeded picture of a colour gradient under a few filled shapes, so that copies of it stay alike."""
    rng = np.random.default_rng(seed)
    width, height = 256, 192
    ramp = np.linspace(0, 1, width)[None, :, None]
    start, end = rng.integers(0, 256, size=(2, 3))
    pixels = (start + (end - start) * ramp) * np.ones((height, 1, 1))
    picture = Image.fromarray(pixels.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(picture)
    for _ in range(6):
        left, top = int(rng.integers(0, width - 40)), int(rng.integers(0, height - 40))
        right, bottom = left + int(rng.integers(30, 120)), top + int(rng.integers(30, 100))
        colour = tuple(int(channel) for channel in rng.integers(0, 256, size=3))
        if rng.random() < 0.5:
            draw.ellipse((left, top, right, bottom), fill=colour)
        else:
            draw.rectangle((left, top, right, bottom), fill=colour)
    return picture


@pytest.fixture
def services(tmp_path):
    embed = dataclasses.replace(
        embed_config.from_env({}), listen="127.0.0.1:0", backend="onnx", model_dir=_MODEL_DIR
    )
    embed_grpc, _, embed_port = embed_server.build_server(embed)
    index = dataclasses.replace(
        index_config.from_env({}), listen="127.0.0.1:0", embed_addr=f"127.0.0.1:{embed_port}",
        data_dir=tmp_path / "index",
    )
    index_grpc, _, index_port, collection = index_server.start(index)
    yield f"127.0.0.1:{index_port}"
    index_grpc.stop(None).wait()
    collection.close()
    embed_grpc.stop(None).wait()


@pytest.fixture
def collection_with_copies(services, tmp_path) -> dict[str, pathlib.Path]:
    """Store four different scenes, a lossless re-encode of scene 0 and a smaller JPEG of scene 1.

    Every image is added, even a duplicate, so that FindDuplicates has groups to find.
    """
    folder = tmp_path / "photos"
    folder.mkdir()
    files = {f"scene-{seed}": (_scene(seed), "PNG", {}) for seed in range(4)}
    files["scene-0-copy"] = (_scene(0), "PNG", {"compress_level": 1})
    scene_1 = _scene(1)
    files["scene-1-small"] = (scene_1.resize((192, 144), Image.LANCZOS), "JPEG", {"quality": 80})
    paths = {}
    requests = []
    for item_id, (picture, image_format, options) in files.items():
        paths[item_id] = folder / f"{item_id}.{image_format.lower()}"
        paths[item_id].write_bytes(encode(picture, image_format, **options))
        requests.append(pb.IngestImagesRequest(
            image=paths[item_id].read_bytes(), item_id=item_id, uri=str(paths[item_id]),
            on_duplicate=pb.ON_DUPLICATE_ADD,
        ))

    with grpc.insecure_channel(services) as channel:
        responses = list(index_service_pb2_grpc.IndexServiceStub(channel).IngestImages(iter(requests), timeout=60))
    assert [response.status for response in responses] == [pb.INGEST_STATUS_ADDED] * len(requests)
    return paths


def test_dupes_json_finds_exact_and_near_copies(services, collection_with_copies, capsys):
    assert cli.main(["dupes", "--addr", services, "--json", "--timeout", "60"]) == 0

    document = json.loads(capsys.readouterr().out)
    groups = {group["kind"]: group["members"] for group in document["groups"]}
    assert len(document["groups"]) == 2
    assert [member["item_id"] for member in groups["exact"]] == ["scene-0", "scene-0-copy"]
    assert [member["item_id"] for member in groups["near"]] == ["scene-1", "scene-1-small"]
    assert groups["exact"][1]["phash_distance"] == 0
    assert groups["exact"][1]["local_difference"] == 0.0
    near_copy = groups["near"][1]
    assert near_copy["uri"] == str(collection_with_copies["scene-1-small"])
    assert (near_copy["width"], near_copy["height"]) == (192, 144)
    assert near_copy["phash_distance"] <= 24
    assert document["summary"] == {
        "item_count": 6, "group_counts": {"exact": 1, "near": 1}, "grouped_item_count": 4,
    }


def test_dupes_html_shows_real_thumbnails(services, collection_with_copies, tmp_path, capsys):
    out = tmp_path / "report.html"

    assert cli.main(["dupes", "--addr", services, "--html", str(out), "--timeout", "60"]) == 0

    assert capsys.readouterr().out.strip() == f"wrote {out}: 2 groups, 4 members, 0 without a readable local image"
    dom = _DomParser()
    dom.feed(out.read_text(encoding="utf-8"))
    assert dom.groups == [("group-1", "exact"), ("group-2", "near")]
    assert dom.member_ids == ["scene-0", "scene-0-copy", "scene-1", "scene-1-small"]
    assert len(dom.images) == 4
