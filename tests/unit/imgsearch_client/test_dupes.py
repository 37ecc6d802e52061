"""Tests of `imgsearch dupes` against a fake IndexService on 127.0.0.1: outputs, options and errors."""

import csv
import io
import json
import re

import grpc
import pytest

from imgsearch.index.v1 import index_service_pb2 as pb
from imgsearch_client import cli
from tests.unit.imgsearch_client.dupes_fakes import FakeIndexService, canned_stream, running, write_photos


@pytest.fixture
def paths(tmp_path):
    return write_photos(tmp_path / "photos")


@pytest.fixture
def fake(paths):
    return FakeIndexService(canned_stream(paths))


def test_text_lists_groups_and_summary(fake, paths, capsys):
    with running(fake) as addr:
        assert cli.main(["dupes", "--addr", addr]) == 0

    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "group 1: exact, 2 items"
    assert lines[1].split() == ["item_id", "score", "pHash", "local", "size", "uri"]
    assert lines[2].split() == ["a1", "1.0000", "0", "0.000", "64x48", str(paths["a1"])]
    assert "group 2: near, 2 items" in lines
    near_line = lines[lines.index("group 2: near, 2 items") + 3]
    assert near_line.split() == ["b2", "0.9877", "3", "0.432", "160x100", paths["b2"].as_uri()]
    assert "group 3: similar, 2 items" in lines
    assert lines[-1] == "9 items examined; groups: 1 exact, 1 near, 1 similar; 6 items in groups"


def test_text_without_groups_says_so(capsys):
    summary = pb.FindDuplicatesSummary(item_count=4, grouped_item_count=0)
    with running(FakeIndexService([pb.FindDuplicatesResponse(summary=summary)])) as addr:
        assert cli.main(["dupes", "--addr", addr]) == 0

    assert capsys.readouterr().out.splitlines() == [
        "no duplicate groups found",
        "4 items examined; groups: 0 exact, 0 near, 0 similar; 0 items in groups",
    ]


def test_json_is_one_document(fake, paths, capsys):
    with running(fake) as addr:
        assert cli.main(["dupes", "--addr", addr, "--json"]) == 0

    document = json.loads(capsys.readouterr().out)
    assert set(document) == {"groups", "summary"}
    assert [group["kind"] for group in document["groups"]] == ["exact", "near", "similar"]
    assert document["groups"][1]["members"][1] == {
        "item_id": "b2", "uri": paths["b2"].as_uri(), "score": 0.987654, "phash_distance": 3,
        "local_difference": 0.4321, "width": 160, "height": 100,
    }
    assert document["summary"] == {
        "item_count": 9, "group_counts": {"exact": 1, "near": 1, "similar": 1}, "grouped_item_count": 6,
    }


def test_csv_has_one_row_per_member(fake, paths, capsys):
    with running(fake) as addr:
        assert cli.main(["dupes", "--addr", addr, "--csv"]) == 0

    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert rows[0] == ["group", "kind", "item_id", "uri", "score", "phash_distance", "local_difference",
                       "width", "height"]
    assert len(rows) == 7
    assert [row[0] for row in rows[1:]] == ["1", "1", "2", "2", "3", "3"]
    assert rows[4] == ["2", "near", "b2", paths["b2"].as_uri(), "0.987654", "3", "0.4321", "160", "100"]


def test_html_report_is_written(fake, tmp_path, capsys):
    out = tmp_path / "report.html"
    with running(fake) as addr:
        assert cli.main(["dupes", "--addr", addr, "--html", str(out)]) == 0

    assert capsys.readouterr().out.strip() == f"wrote {out}: 3 groups, 6 members, 1 without a readable local image"
    page = out.read_text(encoding="utf-8")
    assert page.count('<img class="thumb" src="data:image/jpeg;base64,') == 5
    assert page.count('class="group ') == 3


def test_progress_bar_goes_to_stderr(fake, capsys):
    with running(fake) as addr:
        assert cli.main(["dupes", "--addr", addr, "--json"]) == 0

    captured = capsys.readouterr()
    assert "dupes" in captured.err
    assert "9/9" in captured.err
    assert "dupes:" not in captured.out


def test_options_reach_the_request(capsys):
    fake = FakeIndexService([pb.FindDuplicatesResponse(summary=pb.FindDuplicatesSummary())])
    argv = ["dupes", "--kinds", "similar, exact", "--k", "15", "--min-similar-score", "0.9",
            "--max-phash-distance", "10", "--max-local-difference", "1.25", "--min-score", "-1"]
    with running(fake) as addr:
        assert cli.main(argv + ["--addr", addr]) == 0

    request = fake.requests[0]
    assert list(request.kinds) == [pb.MATCH_KIND_SIMILAR, pb.MATCH_KIND_EXACT]
    assert request.k == 15
    assert request.min_similar_score == pytest.approx(0.9)
    assert request.near_duplicate_policy.max_phash_distance == 10
    assert request.near_duplicate_policy.max_local_difference == pytest.approx(1.25)
    assert request.near_duplicate_policy.min_score == pytest.approx(-1.0)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--kinds", "exact,blurry"], "unknown kind 'blurry'"),
        (["--k", "-1"], "expected 0 or more, got -1"),
        (["--max-phash-distance", "65"], "expected a distance from 0 to 64, got 65"),
        (["--max-local-difference", "-0.5"], "expected a finite number of 0 or more"),
        (["--max-local-difference", "nan"], "expected a finite number of 0 or more"),
        (["--min-score", "1.5"], "expected a score from -1 to 1"),
        (["--min-similar-score", "abc"], "expected a number, got 'abc'"),
        (["--timeout", "0"], "expected a number above 0"),
        (["--json", "--csv"], "not allowed with argument"),
        (["--addr", "nowhere"], "expected HOST:PORT"),
    ],
)
def test_bad_options_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        cli.main(["dupes"] + argv)

    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert "usage: imgsearch dupes" in error
    assert message in error


def test_repeated_kinds_are_sent_once(capsys):
    fake = FakeIndexService([pb.FindDuplicatesResponse(summary=pb.FindDuplicatesSummary())])
    with running(fake) as addr:
        assert cli.main(["dupes", "--addr", addr, "--kinds", "near,NEAR,near"]) == 0

    assert list(fake.requests[0].kinds) == [pb.MATCH_KIND_NEAR]


def _last_error_line(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_server_rejection_exits_1_with_one_line(fake, capsys):
    fake.abort_after = 0
    with running(fake) as addr:
        assert cli.main(["dupes", "--addr", addr, "--max-phash-distance", "64"]) == 1

    assert _last_error_line(capsys) == (
        "imgsearch: error: finding duplicates failed: INVALID_ARGUMENT: max_phash_distance must be at most 64"
    )


def test_failure_mid_stream_names_groups_received(fake, capsys):
    fake.abort_after = 4
    fake.abort_code = grpc.StatusCode.UNAVAILABLE
    fake.abort_message = "embed service is down"
    with running(fake) as addr:
        assert cli.main(["dupes", "--addr", addr, "--json"]) == 1

    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip().splitlines()[-1] == (
        "imgsearch: error: finding duplicates failed after 2 groups: UNAVAILABLE: embed service is down"
    )


def test_stream_without_summary_exits_1(fake, capsys):
    fake.responses = fake.responses[:-1]
    with running(fake) as addr:
        assert cli.main(["dupes", "--addr", addr]) == 1

    assert _last_error_line(capsys) == (
        f"imgsearch: error: the index service at {addr} ended the duplicate stream without its summary"
    )


def test_timeout_exits_1_with_deadline_exceeded(fake, capsys):
    fake.delay_s = 0.5
    with running(fake) as addr:
        assert cli.main(["dupes", "--addr", addr, "--timeout", "0.3"]) == 1

    assert "DEADLINE_EXCEEDED" in _last_error_line(capsys)


def test_closed_port_exits_1_unavailable(capsys):
    assert cli.main(["dupes", "--addr", "127.0.0.1:1", "--timeout", "5"]) == 1

    error = _last_error_line(capsys)
    assert error.startswith("imgsearch: error: finding duplicates failed: UNAVAILABLE:")


def test_unwritable_html_path_exits_1(fake, tmp_path, capsys):
    with running(fake) as addr:
        assert cli.main(["dupes", "--addr", addr, "--html", str(tmp_path / "missing" / "report.html")]) == 1

    assert _last_error_line(capsys) == (
        f"imgsearch: error: cannot write the report to {tmp_path / 'missing' / 'report.html'}: "
        "No such file or directory"
    )


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as stopped:
        cli.main(["dupes", "--help"])

    assert stopped.value.code == 0
    output = capsys.readouterr().out
    for option in ("--addr", "--kinds", "--k", "--min-similar-score", "--max-phash-distance",
                   "--max-local-difference", "--min-score", "--json", "--csv", "--html", "--timeout"):
        assert option in output
    assert "exit status" in output


def test_unknown_distances_print_as_missing(capsys):
    group = pb.DuplicateGroup(kind=pb.MATCH_KIND_SIMILAR, members=[
        pb.DuplicateMember(item_id="old-1", uri="mem://1", score=1.0),
        pb.DuplicateMember(item_id="old-2", uri="mem://2", score=0.97),
    ])
    summary = pb.FindDuplicatesSummary(item_count=2, group_counts={"MATCH_KIND_SIMILAR": 1}, grouped_item_count=2)
    stream = [pb.FindDuplicatesResponse(group=group), pb.FindDuplicatesResponse(summary=summary)]

    with running(FakeIndexService(stream)) as addr:
        assert cli.main(["dupes", "--addr", addr, "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    with running(FakeIndexService(stream)) as addr:
        assert cli.main(["dupes", "--addr", addr]) == 0
    text = capsys.readouterr().out

    members = document["groups"][0]["members"]
    assert members[1]["phash_distance"] is None
    assert members[1]["local_difference"] is None
    assert re.search(r"old-2 +0\.9700 +- +- ", text)
