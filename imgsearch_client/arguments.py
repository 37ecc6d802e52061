"""argparse types that reject bad values on the command line, so that they exit with status 2."""

import argparse


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


def non_negative_int(value: str) -> int:
    """Accept an integer of 0 or more."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {number}")
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
