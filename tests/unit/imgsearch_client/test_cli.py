"""Tests of the command line's parsing, help and exit codes, without any server."""

import pytest

from imgsearch_client import cli


@pytest.mark.parametrize(
    "argv",
    [[], ["serve"], ["serve", "embed"], ["serve", "index"], ["ingest"], ["search"], ["stats"], ["health"],
     ["fetch-model"]],
)
def test_every_command_has_help(argv, capsys):
    with pytest.raises(SystemExit) as stopped:
        cli.main(argv + ["--help"])

    assert stopped.value.code == 0
    output = capsys.readouterr().out
    assert "usage: imgsearch" in output
    assert "exit status" in output


def test_unknown_command_exits_2(capsys):
    with pytest.raises(SystemExit) as stopped:
        cli.main(["frobnicate"])

    assert stopped.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_search_needs_image_or_item_id(capsys):
    assert cli.main(["search", "--addr", "127.0.0.1:1"]) == 1

    assert "give either an IMAGE file or --item-id" in capsys.readouterr().err


def test_ingest_of_missing_path_fails_with_one_line(tmp_path, capsys):
    assert cli.main(["ingest", "--addr", "127.0.0.1:1", str(tmp_path / "missing")]) == 1

    error = capsys.readouterr().err.strip()
    assert error.startswith("imgsearch: error: no such file or folder")
    assert "\n" not in error


def test_stats_against_closed_port_is_unavailable(capsys):
    assert cli.main(["stats", "--addr", "127.0.0.1:1", "--timeout", "2"]) == 1

    assert "UNAVAILABLE" in capsys.readouterr().err


def test_health_against_closed_port_fails(capsys):
    assert cli.main(["health", "--addr", "127.0.0.1:1", "--timeout", "2"]) == 1

    assert "health check of 127.0.0.1:1 failed" in capsys.readouterr().err
