"""The `imgsearch dupes` command: find duplicate groups and print them as text, JSON, CSV or an HTML report."""

import argparse
import csv
import dataclasses
import json
import pathlib
import sys
from typing import TextIO

from tqdm import tqdm

from imgsearch_client import report
from imgsearch_client.arguments import (
    add_filter_options,
    host_port,
    item_filter_of,
    non_negative_float,
    non_negative_int,
    positive_float,
    score,
)
from imgsearch_client.client import (
    DUPLICATE_KINDS,
    ClientError,
    DuplicateCriteria,
    DuplicateGroup,
    DuplicatesProgress,
    DuplicatesSummary,
)
from imgsearch_client.commands import CommandError, Connection

MAX_PHASH_DISTANCE = 64
CSV_COLUMNS = (
    "group", "kind", "item_id", "uri", "score", "phash_distance", "local_difference", "width", "height",
)
# Scores and differences arrive as float32, so more decimals than this would only show rounding noise.
_DECIMALS = 6


@dataclasses.dataclass(frozen=True)
class DuplicatesResult:
    """Everything one FindDuplicates call returned: the groups in stream order and the summary."""

    groups: list[DuplicateGroup]
    summary: DuplicatesSummary


def add_arguments(parser: argparse.ArgumentParser, default_addr: str) -> None:
    """Add the options of `imgsearch dupes` to its subparser."""
    parser.add_argument("--addr", type=host_port, default=default_addr, help="HOST:PORT of the index service")
    parser.add_argument("--kinds", type=kinds_list, metavar="KINDS",
                        help="comma-separated kinds of group to find: exact, near, similar; "
                             "unset means the server's default, exact,near")
    parser.add_argument("-k", "--k", type=non_negative_int, default=0, metavar="N",
                        help="nearest neighbours examined per item; 0 means the server's default, 10")
    parser.add_argument("--min-similar-score", type=score, metavar="S",
                        help="smallest cosine, from -1 to 1, that links two items into a similar group; "
                             "unset means the server's default, 0.95")
    parser.add_argument("--max-phash-distance", type=phash_distance, metavar="N",
                        help=f"largest pHash Hamming distance of near duplicates, 0 to {MAX_PHASH_DISTANCE}; "
                             "unset means the server's default")
    parser.add_argument("--max-local-difference", type=non_negative_float, metavar="X",
                        help="largest local difference of near duplicates, in standard deviations of the picture; "
                             "unset means the server's default")
    parser.add_argument("--min-score", type=score, metavar="S",
                        help="smallest cosine of near duplicates, from -1 to 1, where -1 lets only pHash and "
                             "local difference decide; unset means the server's default")
    add_filter_options(parser)
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true",
                        help='print one JSON document {"groups": [...], "summary": {...}}')
    output.add_argument("--csv", action="store_true", help="print one CSV row per group member, with a header row")
    output.add_argument("--html", type=pathlib.Path, metavar="OUT",
                        help="write a self-contained HTML report with thumbnails to this file")
    parser.add_argument("--timeout", type=positive_float, metavar="SECONDS",
                        help="deadline of the whole call in seconds; none by default")


def kinds_list(value: str) -> tuple[str, ...]:
    """Accept comma-separated duplicate kinds, such as "exact,near". An empty value means the server's default."""
    kinds = tuple(part.strip().lower() for part in value.split(",") if part.strip())
    unknown = [kind for kind in kinds if kind not in DUPLICATE_KINDS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown kind {unknown[0]!r}; expected a comma-separated list of {', '.join(DUPLICATE_KINDS)}"
        )
    return tuple(dict.fromkeys(kinds))


def phash_distance(value: str) -> int:
    """Accept a pHash Hamming distance from 0 to 64."""
    number = non_negative_int(value)
    if number > MAX_PHASH_DISTANCE:
        raise argparse.ArgumentTypeError(f"expected a distance from 0 to {MAX_PHASH_DISTANCE}, got {number}")
    return number


def run(args: argparse.Namespace, connection: Connection | None = None) -> int:
    """Run `imgsearch dupes` with parsed arguments and print or write the groups found."""
    criteria = DuplicateCriteria(
        kinds=args.kinds or (),
        k=args.k,
        min_similar_score=args.min_similar_score,
        max_phash_distance=args.max_phash_distance,
        max_local_difference=args.max_local_difference,
        min_score=args.min_score,
        item_filter=item_filter_of(args.where, args.uri_prefix),
    )
    result = find_duplicates(args.addr, criteria, args.timeout, connection or Connection())

    if args.html is not None:
        _write_html(args.html, result, criteria, args.addr)
    elif args.json:
        print(json.dumps(result_to_json(result), indent=2))
    elif args.csv:
        write_csv(result, sys.stdout)
    else:
        write_text(result, sys.stdout)
    return 0


def find_duplicates(
    addr: str, criteria: DuplicateCriteria, timeout_s: float | None, connection: Connection | None = None
) -> DuplicatesResult:
    """Call FindDuplicates, showing its progress on stderr, and collect the groups and the summary."""
    groups: list[DuplicateGroup] = []
    summary: DuplicatesSummary | None = None
    client = (connection or Connection()).client(addr)
    with client, tqdm(unit="item", desc="dupes", file=sys.stderr) as bar:
        try:
            for event in client.find_duplicates(criteria, timeout_s=timeout_s):
                if isinstance(event, DuplicatesProgress):
                    _show_progress(bar, event)
                elif isinstance(event, DuplicateGroup):
                    groups.append(event)
                else:
                    summary = event
        except (ClientError, ValueError) as error:
            received = f" after {len(groups)} groups" if groups else ""
            raise CommandError(f"finding duplicates failed{received}: {error}") from None
    if summary is None:
        raise CommandError(f"the index service at {addr} ended the duplicate stream without its summary")
    return DuplicatesResult(groups=groups, summary=summary)


def _show_progress(bar: tqdm, progress: DuplicatesProgress) -> None:
    bar.total = progress.item_count
    bar.n = progress.items_done
    bar.refresh()


def result_to_json(result: DuplicatesResult) -> dict[str, object]:
    """Return the JSON document that `dupes --json` prints."""
    groups = [
        {"kind": group.kind, "members": [_member_record(member) for member in group.members]}
        for group in result.groups
    ]
    return {"groups": groups, "summary": dataclasses.asdict(result.summary)}


def _member_record(member) -> dict[str, object]:
    record = dataclasses.asdict(member)
    record["score"] = round(member.score, _DECIMALS)
    if member.local_difference is not None:
        record["local_difference"] = round(member.local_difference, _DECIMALS)
    return record


def write_csv(result: DuplicatesResult, stream: TextIO) -> None:
    """Write a header row, then one row per member. Group numbers count from 1 in stream order."""
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for number, group in enumerate(result.groups, start=1):
        for member in group.members:
            record = _member_record(member)
            writer.writerow([number, group.kind] + [record[column] for column in CSV_COLUMNS[2:]])


def write_text(result: DuplicatesResult, stream: TextIO) -> None:
    """Write each group as a block of aligned member lines, then a one-line summary."""
    if not result.groups:
        stream.write("no duplicate groups found\n")
    for number, group in enumerate(result.groups, start=1):
        count = len(group.members)
        stream.write(f"group {number}: {group.kind}, {count} item{'' if count == 1 else 's'}\n")
        id_width = max(len("item_id"), *(len(member.item_id) for member in group.members))
        stream.write(f"  {'item_id':<{id_width}}  {'score':>7}  {'pHash':>5}  {'local':>7}  {'size':>11}  uri\n")
        for member in group.members:
            size = f"{member.width}x{member.height}"
            phash = "-" if member.phash_distance is None else str(member.phash_distance)
            local = "-" if member.local_difference is None else f"{member.local_difference:.3f}"
            stream.write(
                f"  {member.item_id:<{id_width}}  {member.score:7.4f}  {phash:>5}  "
                f"{local:>7}  {size:>11}  {member.uri}\n"
            )
        stream.write("\n")
    stream.write(_summary_line(result.summary) + "\n")


def _summary_line(summary: DuplicatesSummary) -> str:
    kinds = list(DUPLICATE_KINDS) + sorted(set(summary.group_counts) - set(DUPLICATE_KINDS))
    counts = ", ".join(f"{summary.group_counts.get(kind, 0)} {kind}" for kind in kinds)
    return (
        f"{summary.item_count} items examined; groups: {counts}; "
        f"{summary.grouped_item_count} items in groups"
    )


def _write_html(out: pathlib.Path, result: DuplicatesResult, criteria: DuplicateCriteria, addr: str) -> None:
    try:
        counts = report.write_report(out, result.groups, result.summary, criteria, source=addr)
    except OSError as error:
        raise CommandError(f"cannot write the report to {out}: {error.strerror or error}") from None
    print(
        f"wrote {out}: {counts.groups} groups, {counts.members} members, "
        f"{counts.placeholders} without a readable local image"
    )
