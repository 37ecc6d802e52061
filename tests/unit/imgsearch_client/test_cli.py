"""Tests of the command line's parsing, help and exit codes, without a running server."""

import socket

import pytest

from imgsearch_client import cli, commands


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
    with pytest.raises(SystemExit) as stopped:
        cli.main(["search", "--addr", "127.0.0.1:1"])

    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert "usage: imgsearch search" in error
    assert "give either an IMAGE file or --item-id" in error


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["search", "x.png", "-k", "-3"], "expected 0 or more, got -3"),
        (["search", "x.png", "--min-score", "2"], "expected a score from -1 to 1"),
        (["search", "x.png", "--timeout", "-1"], "expected a number above 0"),
        (["stats", "--addr", "127.0.0.1:99999"], "expected HOST:PORT with a port from 1 to 65535"),
        (["stats", "--addr", "garbage"], "expected HOST:PORT"),
        (["serve", "embed", "--listen", "nonsense"], "expected HOST:PORT"),
    ],
)
def test_bad_option_values_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        cli.main(argv)

    assert stopped.value.code == 2
    assert message in capsys.readouterr().err


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


def test_serve_on_taken_port_fails_with_one_line(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"

        assert cli.main(["serve", "embed", "--backend", "hash", "--listen", address]) == 1

    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("imgsearch: error: the embed service could not start: could not bind")


def test_serve_index_file_data_dir(tmp_path, capsys):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")

    assert cli.main(["serve", "index", "--listen", "127.0.0.1:0", "--data-dir", str(not_a_folder)]) == 1

    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("imgsearch: error: the index service could not start:")
    assert str(not_a_folder) in error


def test_grid_into_a_folder_fails_with_one_line(tmp_path):
    with pytest.raises(commands.CommandError, match=f"cannot write the grid to {tmp_path}"):
        commands._write_grid(None, [], tmp_path)


def test_where_and_uri_prefix_options_build_a_filter():
    from imgsearch_client.arguments import item_filter_of, where_condition

    conditions = [where_condition("tag=dog"), where_condition("tag=cat"), where_condition("starred")]

    item_filter = item_filter_of(conditions, ["photos/2024/"])

    assert dict(item_filter.where) == {"tag": ("dog", "cat"), "starred": ()}
    assert item_filter.uri_prefixes == ("photos/2024/",)
    assert item_filter_of(None, None) is None
    proto = item_filter.to_proto()
    assert [(c.key, list(c.any_of)) for c in proto.metadata] == [("tag", ["dog", "cat"]), ("starred", [])]


def test_where_without_key_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as raised:
        cli.main(["search", "--text", "a dog", "--where", "=dog"])

    assert raised.value.code == 2
    assert "expected KEY=VALUE or KEY" in capsys.readouterr().err
