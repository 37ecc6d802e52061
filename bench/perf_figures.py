"""The performance benchmark's figures: each with its goal, and the summary JSON, Markdown table, plot and README part."""

import dataclasses
import json
import pathlib

from bench.readme_part import replace_part


@dataclasses.dataclass(frozen=True)
class Figure:
    """One measured figure. goal is a readable condition such as ">= 0.9"; met is None when no goal applies."""

    name: str
    value: float
    unit: str
    goal: str | None
    met: bool | None
    note: str = ""


def at_least(name: str, value: float, minimum: float, unit: str = "x", note: str = "") -> Figure:
    return Figure(name, round(value, 4), unit, f">= {minimum:g}", value >= minimum, note)


def at_most(name: str, value: float, maximum: float, unit: str, note: str = "") -> Figure:
    return Figure(name, round(value, 4), unit, f"<= {maximum:g}", value <= maximum, note)


def reported(name: str, value: float, unit: str, note: str = "") -> Figure:
    return Figure(name, round(value, 4), unit, None, None, note)


def write_summary(figures: list[Figure], context: dict, out: pathlib.Path) -> None:
    """Write every figure, with its goal and whether it was met, and the run's context, as JSON."""
    document = {**context, "figures": [dataclasses.asdict(figure) for figure in figures]}
    out.write_text(json.dumps(document, indent=2) + "\n")


def table(figures: list[Figure], context: dict) -> str:
    """Return the figures as a Markdown table, with a line on the run's sizes and machine."""
    lines = [
        f"{context['mode']} run on {context['machine']}; d = {context['dim']}, "
        f"{context['query_count']} queries, k = {context['k']}. GPU: {context['gpu']['summary']}",
        "",
        "| figure | value | goal | met |",
        "|---|---|---|---|",
    ]
    for figure in figures:
        met = {True: "yes", False: "**no**", None: "–"}[figure.met]
        value = f"{figure.value:g} {figure.unit}".strip()
        note = f" ({figure.note})" if figure.note else ""
        lines.append(f"| {figure.name}{note} | {value} | {figure.goal or '–'} | {met} |")
    return "\n".join(lines) + "\n"


def write_plot(figures: list[Figure], out: pathlib.Path) -> None:
    """Plot each figure that has a ratio goal as a bar against its goal line."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    ratios = [f for f in figures if f.unit == "x" and f.goal]
    fig, axes = pyplot.subplots(figsize=(10, 0.5 * len(ratios) + 1.5))
    names = [f.name for f in ratios]
    colours = ["tab:green" if f.met else "tab:red" for f in ratios]
    axes.barh(names, [f.value for f in ratios], color=colours)
    for position, figure in enumerate(ratios):
        goal = float(figure.goal.split()[1])
        axes.plot([goal, goal], [position - 0.4, position + 0.4], color="black", linewidth=2)
        axes.text(figure.value, position, f" {figure.value:.2f}", va="center")
    axes.invert_yaxis()
    axes.set_xscale("log")
    axes.set_xlabel("ratio (black tick: goal; green: met, red: missed)")
    axes.set_title("imgsearch performance, measured side by side in one run")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    pyplot.close(fig)


def update_readme(readme: pathlib.Path, text: str) -> None:
    """Replace the text between the bench-perf markers of the README with text."""
    replace_part(readme, "bench-perf", text)
