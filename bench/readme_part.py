"""Replacing the part of the README between a benchmark's two markers with its latest results."""

import pathlib


def replace_part(readme: pathlib.Path, name: str, text: str) -> None:
    """Replace the text between `<!-- NAME:start -->` and `<!-- NAME:end -->` in readme with text.

    Raises ValueError when the readme lacks the markers.
    """
    start_marker, end_marker = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    content = readme.read_text()
    start, end = content.find(start_marker), content.find(end_marker)
    if start < 0 or end < start:
        raise ValueError(f"{readme} has no {start_marker} ... {end_marker} markers")
    content = content[: start + len(start_marker)] + "\n" + text.rstrip("\n") + "\n" + content[end:]
    readme.write_text(content)
