"""Precision and recall of duplicate groups against the known variants of each original, pair by pair."""

import dataclasses
import itertools
from collections.abc import Iterable, Mapping

from bench.dupes_variants import DISTRACTOR_KINDS, EXACT_KINDS, NEAR_KINDS, SEPARATE_KINDS

ORIGINAL = "original"
# Near duplicates are judged on these kinds for the headline figure; crops are reported by kind.
NEAR_TARGET_KINDS = ("jpeg-95", "jpeg-50", "jpeg-20", "resize-50", "resize-25", "brightness+15",
                     "brightness-15", "metadata-stripped", "exif-added")


@dataclasses.dataclass(frozen=True)
class Member:
    """The origin of a benchmark item: the original it comes from and its variant kind."""

    original: str
    kind: str


def score_groups(
    members: Mapping[str, Member], exact_groups: Iterable[list[str]], near_groups: Iterable[list[str]]
) -> dict:
    """Return the exact and near figures, overall, over the target kinds and by kind."""
    predicted_exact = _pairs(exact_groups)
    predicted_near = predicted_exact | _pairs(near_groups)
    truth_exact = _true_pairs(members, EXACT_KINDS)
    truth_near = _true_pairs(members, EXACT_KINDS + NEAR_KINDS)
    counted = {item for item, member in members.items() if member.kind not in SEPARATE_KINDS}
    target = {item for item, member in members.items()
              if member.kind in (ORIGINAL,) + EXACT_KINDS + NEAR_TARGET_KINDS + DISTRACTOR_KINDS}
    return {
        "exact": _precision_recall(predicted_exact, truth_exact, counted),
        "near": _precision_recall(predicted_near, truth_near, target),
        "near_all_kinds": _precision_recall(predicted_near, truth_near, counted),
        "by_kind": _by_kind(members, predicted_exact, predicted_near),
    }


def _pairs(groups: Iterable[list[str]]) -> set[frozenset[str]]:
    return {frozenset(pair) for group in groups for pair in itertools.combinations(group, 2)}


def _true_pairs(members: Mapping[str, Member], kinds: tuple[str, ...]) -> set[frozenset[str]]:
    families: dict[str, list[str]] = {}
    for item, member in members.items():
        if member.kind == ORIGINAL or member.kind in kinds:
            families.setdefault(member.original, []).append(item)
    return _pairs(families.values())


def _precision_recall(predicted: set, truth: set, allowed: set[str]) -> dict:
    predicted = {pair for pair in predicted if pair <= allowed}
    truth = {pair for pair in truth if pair <= allowed}
    hits = len(predicted & truth)
    return {
        "precision": hits / len(predicted) if predicted else 1.0,
        "recall": hits / len(truth) if truth else 1.0,
        "predicted_pairs": len(predicted),
        "true_pairs": len(truth),
    }


def _by_kind(members: Mapping[str, Member], predicted_exact: set, predicted_near: set) -> dict:
    """For each kind, how often a variant is grouped with its own original as exact and as near."""
    originals = {member.original: item for item, member in members.items() if member.kind == ORIGINAL}
    counts: dict[str, dict[str, int]] = {}
    for item, member in members.items():
        if member.kind == ORIGINAL:
            continue
        pair = frozenset((item, originals[member.original]))
        tally = counts.setdefault(member.kind, {"variants": 0, "exact": 0, "near": 0})
        tally["variants"] += 1
        tally["exact"] += pair in predicted_exact
        tally["near"] += pair in predicted_near
    return {kind: _kind_figures(kind, tally) for kind, tally in counts.items()}


def _kind_figures(kind: str, tally: dict[str, int]) -> dict:
    variants = tally["variants"]
    figures = {
        "variants": variants,
        "labelled_exact": tally["exact"] / variants,
        "labelled_near_or_exact": tally["near"] / variants,
    }
    if kind in EXACT_KINDS:
        figures["expected"] = "exact"
    elif kind in NEAR_KINDS:
        figures["expected"] = "near"
    elif kind in DISTRACTOR_KINDS:
        figures["expected"] = "neither"
    else:
        figures["expected"] = "reported separately"
    return figures
