"""Render duplicate groups as one self-contained HTML page, with thumbnails embedded as data URIs."""

import base64
import dataclasses
import html
import io
import pathlib
import urllib.parse
import urllib.request
from collections.abc import Sequence

from imgsearch_client.client import (
    DUPLICATE_KINDS,
    DuplicateCriteria,
    DuplicateGroup,
    DuplicateMember,
    DuplicatesSummary,
)
from imgsearch_common.errors import ImgsearchError, TooLargeError
from imgsearch_common.images import decode_rgb

THUMBNAIL_SIDE = 160
# Files above these limits are not read for a thumbnail, so one huge file cannot stall the report.
_MAX_FILE_BYTES = 64 * 1024 * 1024
_MAX_PIXELS = 50_000_000
_JPEG_QUALITY = 85

_STYLE = """
:root { --exact: #c0392b; --near: #d35400; --similar: #2166ac; --unknown: #6b6b6b; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1f2328;
       background: #f3f4f6; }
header { background: #fff; border-bottom: 1px solid #d8dde3; padding: 16px 24px; }
h1 { margin: 0 0 12px; font-size: 20px; }
h2 { margin: 0 0 10px; font-size: 15px; font-weight: 600; }
.panels { display: flex; flex-wrap: wrap; gap: 12px 48px; }
.panel h3 { margin: 0 0 4px; font-size: 12px; text-transform: uppercase; letter-spacing: .05em; color: #59636e; }
dl { display: grid; grid-template-columns: auto auto; gap: 2px 16px; margin: 0; }
dt { color: #59636e; }
dd { margin: 0; font-weight: 600; font-variant-numeric: tabular-nums; }
.default { font-weight: 400; color: #8c959f; }
main { padding: 16px 24px; }
.empty { color: #59636e; }
.group { background: #fff; border-left: 6px solid var(--kind); border-radius: 6px; padding: 12px 16px;
         margin: 0 0 16px; box-shadow: 0 1px 2px rgba(0, 0, 0, .08); }
.kind-exact { --kind: var(--exact); }
.kind-near { --kind: var(--near); }
.kind-similar { --kind: var(--similar); }
.kind-unknown { --kind: var(--unknown); }
.badge { display: inline-block; padding: 0 8px; border-radius: 9px; background: var(--kind); color: #fff;
         font-size: 11px; font-weight: 600; line-height: 18px; text-transform: uppercase; letter-spacing: .05em; }
.members { display: flex; flex-wrap: wrap; gap: 14px; }
figure { margin: 0; width: 162px; }
.thumb { display: block; width: 162px; height: 162px; object-fit: contain; background: #eef0f2;
         border: 1px solid #d8dde3; border-radius: 4px; }
.reference .thumb { border: 2px solid var(--kind); }
.placeholder { display: flex; align-items: center; justify-content: center; padding: 8px; background: #c9cdd2;
               color: #3d444d; font-size: 12px; text-align: center; }
figcaption { margin-top: 4px; font-size: 12px; font-variant-numeric: tabular-nums; }
.item-id { font-family: ui-monospace, "SFMono-Regular", Menlo, monospace; font-weight: 600; overflow-wrap: anywhere; }
/* Right-to-left direction puts the ellipsis at the start, so the file name stays visible.
   The bdi element inside keeps the characters in their order. */
.uri { color: #59636e; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; direction: rtl;
       text-align: left; }
"""


@dataclasses.dataclass(frozen=True)
class Thumbnail:
    """A member's preview: a data URI of a JPEG at most THUMBNAIL_SIDE pixels a side, or why there is none."""

    data_uri: str | None
    reason: str = ""


@dataclasses.dataclass(frozen=True)
class ReportCounts:
    """Counts of a written report: groups, members, and members shown as a grey placeholder."""

    groups: int
    members: int
    placeholders: int


def write_report(
    out: pathlib.Path,
    groups: Sequence[DuplicateGroup],
    summary: DuplicatesSummary,
    criteria: DuplicateCriteria,
    source: str,
) -> ReportCounts:
    """Write the HTML report to out and return its counts.

    source names where the groups came from, for example the server address. Raises OSError when out
    cannot be written.
    """
    thumbnails = _thumbnails_of(groups)
    page = render_report(groups, summary, criteria, source, thumbnails)
    out.write_text(page, encoding="utf-8")
    placeholders = sum(1 for group in groups for member in group.members if thumbnails[member.uri].data_uri is None)
    members = sum(len(group.members) for group in groups)
    return ReportCounts(groups=len(groups), members=members, placeholders=placeholders)


def render_report(
    groups: Sequence[DuplicateGroup],
    summary: DuplicatesSummary,
    criteria: DuplicateCriteria,
    source: str,
    thumbnails: dict[str, Thumbnail] | None = None,
) -> str:
    """Render the report page. thumbnails maps each member's uri to its preview, and is built when None."""
    if thumbnails is None:
        thumbnails = _thumbnails_of(groups)
    sections = [_group_html(number, group, thumbnails) for number, group in enumerate(groups, start=1)]
    body = "\n".join(sections) if sections else '<p class="empty">No duplicate groups found.</p>'
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>Duplicate report: {_escape(source)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        f"{_header_html(summary, criteria, source)}\n<main>\n{body}\n</main>\n</body>\n</html>\n"
    )


def make_thumbnail(uri: str) -> Thumbnail:
    """Read the image at uri when it is a local file (a path or a file: URL) and shrink it to a JPEG data URI."""
    path = _local_path(uri)
    if path is None:
        return Thumbnail(None, "not a local file")
    try:
        size = path.stat().st_size
        if size > _MAX_FILE_BYTES:
            return Thumbnail(None, f"too large to preview: {size} bytes, above the limit of {_MAX_FILE_BYTES}")
        picture = decode_rgb(path.read_bytes(), _MAX_PIXELS)
    except OSError as error:
        return Thumbnail(None, f"cannot read file: {error.strerror or error}")
    except TooLargeError as error:
        return Thumbnail(None, f"too large to preview: {error}")
    except ImgsearchError as error:
        return Thumbnail(None, f"not a readable image: {error}")

    picture.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=_JPEG_QUALITY)
    return Thumbnail("data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"))


def _thumbnails_of(groups: Sequence[DuplicateGroup]) -> dict[str, Thumbnail]:
    """Make each distinct uri's thumbnail once, because an item can appear in groups of several kinds."""
    thumbnails: dict[str, Thumbnail] = {}
    for group in groups:
        for member in group.members:
            if member.uri not in thumbnails:
                thumbnails[member.uri] = make_thumbnail(member.uri)
    return thumbnails


def _local_path(uri: str) -> pathlib.Path | None:
    if not uri:
        return None
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            return None
        return pathlib.Path(urllib.request.url2pathname(parts.path))
    # A one-letter scheme is a Windows drive letter, as in C:\photos\a.jpg, so the uri is a path.
    if len(parts.scheme) > 1:
        return None
    return pathlib.Path(uri)


def _header_html(summary: DuplicatesSummary, criteria: DuplicateCriteria, source: str) -> str:
    kinds = list(DUPLICATE_KINDS) + sorted(set(summary.group_counts) - set(DUPLICATE_KINDS))
    group_rows = [
        (f'<span class="badge {_kind_class(kind)}">{_escape(kind)}</span> groups',
         str(summary.group_counts.get(kind, 0)))
        for kind in kinds
    ]
    totals = [
        ("items examined", str(summary.item_count)),
        *group_rows,
        ("items in groups", str(summary.grouped_item_count)),
    ]
    return (
        f"<header>\n<h1>Duplicate report</h1>\n"
        f'<div class="panels">\n{_panel("Summary", totals)}\n{_panel("Thresholds", _threshold_rows(criteria))}\n'
        f'{_panel("Source", [("index service", _escape(source))])}\n</div>\n</header>'
    )


def _threshold_rows(criteria: DuplicateCriteria) -> list[tuple[str, str]]:
    """Return label and value rows of the criteria sent. An unset criterion shows that the server chose it."""
    kinds = ", ".join(criteria.kinds) if criteria.kinds else None
    return [
        ("kinds", _value_or_default(kinds, "exact, near")),
        ("neighbours per item (k)", _value_or_default(criteria.k or None, "10")),
        ("min similar score", _value_or_default(criteria.min_similar_score, "0.95")),
        ("max pHash distance", _value_or_default(criteria.max_phash_distance)),
        ("max local difference", _value_or_default(criteria.max_local_difference)),
        ("min score of near duplicates", _value_or_default(criteria.min_score)),
    ]


def _value_or_default(value: object, documented_default: str | None = None) -> str:
    if value is not None:
        return _escape(str(value))
    # The proto documents some defaults, and those are shown. The others are server settings the client cannot see.
    default_text = f"server default, {documented_default}" if documented_default else "server default"
    return f'<span class="default">{default_text}</span>'


def _panel(title: str, rows: list[tuple[str, str]]) -> str:
    """Build a titled list of label and value pairs, which must already be escaped HTML."""
    items = "".join(f"<dt>{label}</dt><dd>{value}</dd>" for label, value in rows)
    return f'<section class="panel"><h3>{title}</h3><dl>{items}</dl></section>'


def _group_html(number: int, group: DuplicateGroup, thumbnails: dict[str, Thumbnail]) -> str:
    members = "\n".join(
        _member_html(member, thumbnails[member.uri], is_reference=position == 0)
        for position, member in enumerate(group.members)
    )
    count = len(group.members)
    return (
        f'<section class="group {_kind_class(group.kind)}" id="group-{number}" data-kind="{_escape(group.kind)}">\n'
        f'<h2>Group {number} <span class="badge">{_escape(group.kind)}</span> '
        f'{count} item{"" if count == 1 else "s"}</h2>\n<div class="members">\n{members}\n</div>\n</section>'
    )


def _member_html(member: DuplicateMember, thumbnail: Thumbnail, is_reference: bool) -> str:
    item_id = _escape(member.item_id)
    if thumbnail.data_uri is None:
        reason = _escape(thumbnail.reason)
        picture = f'<div class="thumb placeholder" title="{reason}">{reason}</div>'
    else:
        picture = f'<img class="thumb" src="{thumbnail.data_uri}" alt="{item_id}">'
    phash = "–" if member.phash_distance is None else member.phash_distance
    local = "–" if member.local_difference is None else f"{member.local_difference:.2f}"
    distances = f"pHash {phash} · local {local}"
    size = f"{member.width}×{member.height}" + (" · reference" if is_reference else "")
    return (
        f'<figure class="member{" reference" if is_reference else ""}" data-item-id="{item_id}">{picture}'
        f'<figcaption><div class="item-id">{item_id}</div><div>score {member.score:.4f}</div>'
        f"<div>{distances}</div><div>{size}</div>"
        f'<div class="uri" title="{_escape(member.uri)}"><bdi>{_escape(member.uri) or "no uri"}</bdi></div>'
        "</figcaption></figure>"
    )


def _kind_class(kind: str) -> str:
    return f"kind-{kind}" if kind in DUPLICATE_KINDS else "kind-unknown"


def _escape(text: str) -> str:
    return html.escape(text, quote=True)
