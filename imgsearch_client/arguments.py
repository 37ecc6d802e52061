"""argparse types that reject bad values on the command line, so that they exit with status 2."""

import argparse

from imgsearch_client.client import ItemFilter


def host_port(value: str) -> str:
    """Accept HOST:PORT (or [IPV6]:PORT) to connect to, with a port from 1 to 65535."""
    return _address(value, lowest_port=1)


def listen_address(value: str) -> str:
    """Accept HOST:PORT to listen on; port 0 lets the system pick a free one."""
    return _address(value, lowest_port=0)


def _address(value: str, lowest_port: int) -> str:
    host, separator, port = value.rpartition(":")
    if not separator or not host or not port.isdigit() or not lowest_port <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(
            f"expected HOST:PORT with a port from {lowest_port} to 65535, got {value!r}"
        )
    return value


def search_text(value: str) -> str:
    """Accept a text to search for: anything but an empty or whitespace-only string."""
    if not value.strip():
        raise argparse.ArgumentTypeError("expected words to search for, got an empty text")
    return value


def positive_int(value: str) -> int:
    """Accept an integer of 1 or more."""
    return _int_at_least(value, 1)


def non_negative_int(value: str) -> int:
    """Accept an integer of 0 or more."""
    return _int_at_least(value, 0)


def _int_at_least(value: str, minimum: int) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
    if number < minimum:
        raise argparse.ArgumentTypeError(f"expected {minimum} or more, got {number}")
    return number


def positive_float(value: str) -> float:
    """Accept a number above 0."""
    number = _float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {value!r}")
    return number


def score(value: str) -> float:
    """Accept a cosine similarity from -1 to 1."""
    number = _float(value)
    if not -1.0 <= number <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a score from -1 to 1, got {value!r}")
    return number


def non_negative_float(value: str) -> float:
    """Accept a finite number of 0 or more."""
    number = _float(value)
    if not 0.0 <= number < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number of 0 or more, got {value!r}")
    return number


def _float(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None


def where_condition(value: str) -> tuple[str, str | None]:
    """Parse `KEY=VALUE` (the metadata key must have that value) or `KEY` (it must be present)."""
    key, equals, wanted = value.partition("=")
    if not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE or KEY, got {value!r}")
    return key, wanted if equals else None


def item_filter_of(conditions: list[tuple[str, str | None]] | None, uri_prefixes: list[str] | None) -> ItemFilter | None:
    """Return the client ItemFilter of --where and --uri-prefix options, or None when neither was given.

    Values given for the same key are alternatives: the item's value must equal one of them.
    """
    if not conditions and not uri_prefixes:
        return None
    where: dict[str, tuple[str, ...]] = {}
    for key, wanted in conditions or []:
        where[key] = where.get(key, ()) + (() if wanted is None else (wanted,))
    return ItemFilter(where=where, uri_prefixes=tuple(uri_prefixes or ()))


def add_filter_options(parser: argparse.ArgumentParser) -> None:
    """Add --where and --uri-prefix to a command that searches."""
    parser.add_argument("--where", type=where_condition, action="append", metavar="KEY[=VALUE]",
                        help="only items whose metadata KEY equals VALUE (or, without =VALUE, has KEY); "
                             "repeat for more conditions, and repeat a KEY to allow several values")
    parser.add_argument("--uri-prefix", action="append", metavar="PREFIX",
                        help="only items whose uri starts with PREFIX, for example a source folder; repeatable")
