"""The duplicate benchmark's Markdown table and plot."""

import pathlib

from bench.dupes_variants import DISTRACTOR_KINDS, EXACT_KINDS, NEAR_KINDS, SEPARATE_KINDS
from bench.readme_part import replace_part

_KIND_ORDER = EXACT_KINDS + NEAR_KINDS + DISTRACTOR_KINDS + SEPARATE_KINDS


def write_table(result: dict, out: pathlib.Path) -> None:
    """Write the headline figures and the per-kind table as Markdown."""
    model = result["model"]
    model_note = " (random weights: model figures say nothing about CLIP)" if model["random_weights"] else ""
    lines = [
        f"{result['originals']} COCO128 originals, {result['images']} images in all; model "
        f"`{model['model_id']}`{model_note}.",
        "",
        "| figure | perceptual signals alone | with the model's score |",
        "|---|---|---|",
    ]
    for key, label in (("exact", "exact"), ("near", "near (target kinds)"), ("near_all_kinds", "near (all kinds)")):
        alone, with_model = result["perceptual_only"][key], result["with_model"][key]
        lines.append(f"| {label}: precision / recall | {alone['precision']:.3f} / {alone['recall']:.3f} | "
                     f"{with_model['precision']:.3f} / {with_model['recall']:.3f} |")
    lines += [
        "",
        "| variant kind | expected | variants | grouped exact | grouped near or exact |",
        "|---|---|---|---|---|",
    ]
    by_kind = result["perceptual_only"]["by_kind"]
    for kind in _KIND_ORDER:
        if kind in by_kind:
            row = by_kind[kind]
            lines.append(f"| {kind} | {row['expected']} | {row['variants']} | {row['labelled_exact']:.3f} | "
                         f"{row['labelled_near_or_exact']:.3f} |")
    out.write_text("\n".join(lines) + "\n")


def write_plot(distances: dict[str, list[tuple[int, float]]], policy: dict, out: pathlib.Path) -> None:
    """Plot each kind's local differences to its original, with the near-duplicate threshold."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    kinds = [kind for kind in _KIND_ORDER if kind in distances]
    figure, axes = pyplot.subplots(figsize=(10, 6))
    axes.boxplot([[local for _, local in distances[kind]] for kind in kinds], vert=False, whis=(0, 100))
    axes.set_yticks(range(1, len(kinds) + 1), kinds)
    axes.axvline(policy["max_local_difference"], color="tab:red", linestyle="--",
                 label=f"near threshold {policy['max_local_difference']}")
    axes.set_xscale("symlog", linthresh=0.1)
    axes.set_xlim(left=0)
    axes.set_xlabel("local difference to the original (symlog scale)")
    axes.set_title("Duplicate benchmark: local difference of each variant kind")
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    pyplot.close(figure)


def update_readme(readme: pathlib.Path, table: str) -> None:
    """Replace the text between the bench-dupes markers of the README with the table."""
    replace_part(readme, "bench-dupes", table)
