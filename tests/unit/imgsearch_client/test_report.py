"""Tests of the HTML duplicate report: structure, escaping, thresholds and embedded thumbnails."""

import base64
import html.parser
import io

import pytest
from PIL import Image

from imgsearch_client import report
from imgsearch_client.client import DuplicateCriteria, DuplicateGroup, DuplicateMember, DuplicatesSummary
from tests.fakes.images import encode, noise_png, solid_png

_SUMMARY = DuplicatesSummary(item_count=5, group_counts={"exact": 1, "near": 1}, grouped_item_count=4)


class _PageParser(html.parser.HTMLParser):
    """Collects the page's img sources, members, groups and visible text."""

    def __init__(self):
        super().__init__()
        self.image_sources: list[str] = []
        self.member_ids: list[str] = []
        self.groups: list[dict[str, str]] = []
        self.placeholders: list[str] = []
        self.text: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.tags.append(tag)
        classes = (attributes.get("class") or "").split()
        if tag == "img":
            self.image_sources.append(attributes["src"])
        if "member" in classes:
            self.member_ids.append(attributes["data-item-id"])
        if "group" in classes:
            self.groups.append(attributes)
        if "placeholder" in classes:
            self.placeholders.append(attributes["title"])

    def handle_data(self, data):
        self.text.append(data)


def _parse(page: str) -> _PageParser:
    parser = _PageParser()
    parser.feed(page)
    parser.close()
    return parser


def _member(item_id: str, uri: str, **values) -> DuplicateMember:
    fields = {"score": 1.0, "phash_distance": 0, "local_difference": 0.0, "width": 64, "height": 48} | values
    return DuplicateMember(item_id=item_id, uri=uri, **fields)


def _decode_data_uri(source: str) -> Image.Image:
    prefix = "data:image/jpeg;base64,"
    assert source.startswith(prefix)
    image = Image.open(io.BytesIO(base64.b64decode(source[len(prefix):], validate=True)))
    image.load()
    return image


@pytest.fixture
def two_groups(tmp_path):
    (tmp_path / "a.png").write_bytes(noise_png(400, 300, seed=1))
    (tmp_path / "b.png").write_bytes(noise_png(120, 90, seed=1))
    (tmp_path / "c.png").write_bytes(solid_png(100, 500, (200, 30, 30)))
    exact = DuplicateGroup("exact", (_member("a", str(tmp_path / "a.png"), width=400, height=300),
                                     _member("b", (tmp_path / "b.png").as_uri(), width=120, height=90)))
    near = DuplicateGroup("near", (_member("c", str(tmp_path / "c.png"), width=100, height=500),
                                   _member("d", "mem://d", score=0.93, phash_distance=4, local_difference=0.75)))
    return [exact, near]


def test_every_group_and_member_appears(two_groups):
    page = _parse(report.render_report(two_groups, _SUMMARY, DuplicateCriteria(), "127.0.0.1:50052"))

    assert [group["id"] for group in page.groups] == ["group-1", "group-2"]
    assert [group["data-kind"] for group in page.groups] == ["exact", "near"]
    assert "kind-exact" in page.groups[0]["class"]
    assert "kind-near" in page.groups[1]["class"]
    assert page.member_ids == ["a", "b", "c", "d"]


def test_local_files_become_small_jpeg_thumbnails(two_groups):
    page = _parse(report.render_report(two_groups, _SUMMARY, DuplicateCriteria(), "addr"))

    assert len(page.image_sources) == 3
    sizes = [_decode_data_uri(source).size for source in page.image_sources]
    # Each thumbnail keeps its aspect ratio within 160 pixels a side.
    assert sizes == [(160, 120), (120, 90), (32, 160)]
    assert page.placeholders == ["not a local file"]


def test_thumbnail_colours_survive(tmp_path):
    (tmp_path / "red.png").write_bytes(solid_png(50, 50, (220, 20, 20)))

    thumbnail = report.make_thumbnail(str(tmp_path / "red.png"))

    red, green, blue = _decode_data_uri(thumbnail.data_uri).convert("RGB").getpixel((25, 25))
    assert red > 200
    assert green < 40
    assert blue < 40


def test_exif_orientation_is_applied(tmp_path):
    picture = Image.new("RGB", (200, 100), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when displayed
    (tmp_path / "turned.jpg").write_bytes(encode(picture, "JPEG", exif=exif))

    thumbnail = report.make_thumbnail(str(tmp_path / "turned.jpg"))

    assert _decode_data_uri(thumbnail.data_uri).size == (80, 160)


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        ("", "not a local file"),
        ("https://images.example/a.jpg", "not a local file"),
        ("mem://3", "not a local file"),
        ("file://otherhost/photos/a.jpg", "not a local file"),
    ],
)
def test_non_local_uris_get_placeholders(uri, reason):
    assert report.make_thumbnail(uri) == report.Thumbnail(None, reason)


def test_missing_file_gets_placeholder_with_reason(tmp_path):
    thumbnail = report.make_thumbnail(str(tmp_path / "gone.png"))

    assert thumbnail.data_uri is None
    assert thumbnail.reason == "cannot read file: No such file or directory"


def test_folder_gets_placeholder(tmp_path):
    thumbnail = report.make_thumbnail(str(tmp_path))

    assert thumbnail.data_uri is None
    assert thumbnail.reason.startswith("cannot read file:")


def test_file_that_is_not_an_image_gets_placeholder(tmp_path):
    (tmp_path / "notes.png").write_text("plain text")

    thumbnail = report.make_thumbnail(str(tmp_path / "notes.png"))

    assert thumbnail.data_uri is None
    assert thumbnail.reason.startswith("not a readable image:")


def test_text_and_attributes_are_escaped():
    hostile = '<script>alert("x")</script>'
    group = DuplicateGroup("near", (_member(hostile, 'mem://"onerror="alert(1)'), _member("b&c", "mem://<b>")))
    summary = DuplicatesSummary(item_count=2, group_counts={"<i>odd</i>": 1}, grouped_item_count=2)

    page_text = report.render_report([group], summary, DuplicateCriteria(kinds=("near",)), "<host>:1")

    assert "<script>" not in page_text
    assert "<i>" not in page_text
    assert "<host>" not in page_text
    page = _parse(page_text)
    assert "script" not in page.tags
    assert page.member_ids == [hostile, "b&c"]
    assert hostile in "".join(page.text)
    assert 'mem://"onerror="alert(1)' in "".join(page.text)


def test_header_shows_summary_and_thresholds():
    criteria = DuplicateCriteria(kinds=("exact", "similar"), k=20, max_phash_distance=8, min_score=-1.0)

    page = _parse(report.render_report([], _SUMMARY, criteria, "127.0.0.1:6000"))

    text = " ".join(" ".join(page.text).split())
    assert "items examined 5" in text
    assert "exact groups 1" in text
    assert "near groups 1" in text
    assert "similar groups 0" in text
    assert "items in groups 4" in text
    assert "kinds exact, similar" in text
    assert "neighbours per item (k) 20" in text
    assert "max pHash distance 8" in text
    assert "min score of near duplicates -1.0" in text
    assert "min similar score server default, 0.95" in text
    assert "max local difference server default" in text
    assert "127.0.0.1:6000" in text
    assert "No duplicate groups found." in text


def test_page_needs_no_external_resources(two_groups):
    page_text = report.render_report(two_groups, _SUMMARY, DuplicateCriteria(), "addr")

    for marker in ("http://", "https://", "<link", "<script", "@import", "url("):
        assert marker not in page_text.replace("mem://d", "")


def test_same_uri_in_two_groups_is_read_once(tmp_path, monkeypatch):
    (tmp_path / "a.png").write_bytes(noise_png(30, 30, seed=5))
    uri = str(tmp_path / "a.png")
    groups = [DuplicateGroup("near", (_member("a", uri), _member("b", uri))),
              DuplicateGroup("similar", (_member("a", uri), _member("c", "mem://c")))]
    thumbnail_uris = []
    real_make_thumbnail = report.make_thumbnail
    monkeypatch.setattr(
        report, "make_thumbnail", lambda value: thumbnail_uris.append(value) or real_make_thumbnail(value)
    )

    page = _parse(report.render_report(groups, _SUMMARY, DuplicateCriteria(), "addr"))

    assert thumbnail_uris == [uri, "mem://c"]
    assert len(page.image_sources) == 3


def test_write_report_counts_placeholders(two_groups, tmp_path):
    out = tmp_path / "report.html"

    counts = report.write_report(out, two_groups, _SUMMARY, DuplicateCriteria(), "addr")

    assert counts == report.ReportCounts(groups=2, members=4, placeholders=1)
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


def test_write_report_into_missing_folder_raises_os_error(two_groups, tmp_path):
    with pytest.raises(OSError):
        report.write_report(tmp_path / "missing" / "report.html", two_groups, _SUMMARY, DuplicateCriteria(), "addr")


def test_file_above_byte_limit_gets_placeholder(tmp_path, monkeypatch):
    (tmp_path / "big.png").write_bytes(noise_png(40, 40, seed=6))
    monkeypatch.setattr(report, "_MAX_FILE_BYTES", 100)

    thumbnail = report.make_thumbnail(str(tmp_path / "big.png"))

    assert thumbnail.data_uri is None
    assert thumbnail.reason.startswith("too large to preview: ")
    assert thumbnail.reason.endswith("bytes, above the limit of 100")


def test_image_above_pixel_limit_gets_placeholder(tmp_path, monkeypatch):
    (tmp_path / "wide.png").write_bytes(solid_png(400, 300, (1, 2, 3)))
    monkeypatch.setattr(report, "_MAX_PIXELS", 1000)

    thumbnail = report.make_thumbnail(str(tmp_path / "wide.png"))

    assert thumbnail.data_uri is None
    assert thumbnail.reason.startswith("too large to preview: ")
    assert "400x300" in thumbnail.reason
