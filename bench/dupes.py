"""The duplicate benchmark: ingest COCO128 originals and their variants, audit, and score the groups.

Run with `make bench-dupes`. Exact and near figures come from FindDuplicates over the whole
collection, twice: with the perceptual signals alone (min_score -1) and with the model's score as
well. Figures that involve the model are only as good as the model: with the tiny random CLIP they
tell nothing about CLIP.
"""

import argparse
import json
import pathlib
import sys
import tempfile
import time

from PIL import Image
from tqdm import tqdm

from bench.dupes_metrics import ORIGINAL, Member, score_groups
from bench.dupes_report import update_readme, write_plot, write_table
from bench.dupes_variants import make_variants, yolo_boxes
from bench.services import running_services
from imgsearch_client.client import DuplicateCriteria, DuplicateGroup, IndexClient, IngestItem
from imgsearch_common.fingerprints import compare, compute_fingerprint
from imgsearch_common.images import decode_rgb
from imgsearch_common.logs import configure_logging

_MAX_PIXELS = 50_000_000


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write its results; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=pathlib.Path, required=True, help="COCO128 folder with images/ and labels/")
    parser.add_argument("--model-dir", type=pathlib.Path, required=True, help="CLIP ONNX model folder")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench/results"), help="results folder")
    parser.add_argument("--limit", type=int, default=0, help="use only the first N originals (0: all)")
    parser.add_argument("--readme", type=pathlib.Path, help="README whose bench-dupes section gets the table")
    args = parser.parse_args(argv)
    configure_logging("warning")

    items, members = _build_items(args.dataset, args.limit)
    distances = _measure_distances(items, members)
    with tempfile.TemporaryDirectory(prefix="bench-dupes-") as data_dir:
        with running_services(args.model_dir, pathlib.Path(data_dir)) as (index_addr, model):
            runs = _ingest_and_audit(index_addr, items, members)

    result = _result_document(runs, members, model, args)
    result["distances_by_kind"] = _distance_ranges(distances)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dupes.json").write_text(json.dumps(result, indent=2) + "\n")
    write_table(result, args.out / "dupes.md")
    write_plot(distances, result["policy"], args.out / "dupes.png")
    table = (args.out / "dupes.md").read_text()
    if args.readme:
        update_readme(args.readme, table)
    print(table)
    return 0


def _build_items(dataset: pathlib.Path, limit: int) -> tuple[dict[str, bytes], dict[str, Member]]:
    """Return every benchmark image by item_id, and what each one is."""
    originals = sorted((dataset / "images" / "train2017").glob("*.jpg"))
    if limit:
        originals = originals[:limit]
    items: dict[str, bytes] = {}
    members: dict[str, Member] = {}
    for path in tqdm(originals, desc="variants", unit="original", file=sys.stderr):
        data = path.read_bytes()
        with Image.open(path) as picture:
            boxes = yolo_boxes(dataset / "labels" / "train2017" / f"{path.stem}.txt", *picture.size)
        items[path.stem], members[path.stem] = data, Member(path.stem, ORIGINAL)
        for variant in make_variants(data, boxes):
            item_id = f"{path.stem}/{variant.kind}"
            items[item_id], members[item_id] = variant.data, Member(path.stem, variant.kind)
    return items, members


def _measure_distances(items: dict[str, bytes], members: dict[str, Member]) -> dict[str, list[tuple[int, float]]]:
    """Return, per kind, the pHash distance and local difference of each variant to its original."""
    fingerprints = {
        item_id: compute_fingerprint(decode_rgb(data, _MAX_PIXELS))
        for item_id, data in tqdm(items.items(), desc="fingerprints", unit="image", file=sys.stderr)
    }
    distances: dict[str, list[tuple[int, float]]] = {}
    for item_id, member in members.items():
        if member.kind == ORIGINAL:
            continue
        distance = compare(fingerprints[member.original], fingerprints[item_id])
        distances.setdefault(member.kind, []).append((distance.phash_distance, distance.local_difference))
    return distances


def _ingest_and_audit(index_addr: str, items: dict[str, bytes], members: dict[str, Member]) -> dict:
    with IndexClient(index_addr, timeout_s=600.0) as client:
        started = time.perf_counter()
        requests = (
            IngestItem(image=data, item_id=item_id, metadata={"kind": members[item_id].kind}, on_duplicate="add")
            for item_id, data in items.items()
        )
        outcomes = list(tqdm(client.ingest(requests), total=len(items), desc="ingest", unit="image", file=sys.stderr))
        ingest_s = time.perf_counter() - started
        failed = [outcome for outcome in outcomes if outcome.failed]
        if failed:
            raise RuntimeError(f"{len(failed)} benchmark images failed to ingest, first: {failed[0]}")

        runs = {"ingest_images_per_s": len(items) / ingest_s}
        for name, criteria in (
            ("perceptual_only", DuplicateCriteria(kinds=("exact", "near"), min_score=-1.0)),
            ("with_model", DuplicateCriteria(kinds=("exact", "near"))),
        ):
            started = time.perf_counter()
            groups = [event for event in client.find_duplicates(criteria) if isinstance(event, DuplicateGroup)]
            runs[name] = {"groups": groups, "audit_s": time.perf_counter() - started}
    return runs


def _result_document(runs: dict, members: dict[str, Member], model: dict, args) -> dict:
    scored = {}
    for name in ("perceptual_only", "with_model"):
        groups = runs[name]["groups"]
        exact = [[m.item_id for m in g.members] for g in groups if g.kind == "exact"]
        near = [[m.item_id for m in g.members] for g in groups if g.kind == "near"]
        scored[name] = {**score_groups(members, exact, near), "audit_s": runs[name]["audit_s"]}
    headline = scored["perceptual_only"]
    return {
        "exact": headline["exact"],
        "near": headline["near"],
        "by_kind": headline["by_kind"],
        "perceptual_only": scored["perceptual_only"],
        "with_model": scored["with_model"],
        "model": model,
        "policy": _default_policy(),
        "images": len(members),
        "originals": sum(1 for member in members.values() if member.kind == ORIGINAL),
        "ingest_images_per_s": runs["ingest_images_per_s"],
        "dataset": str(args.dataset),
        "note": "with_model figures depend on the model; with random weights they say nothing about CLIP",
    }


def _distance_ranges(distances: dict[str, list[tuple[int, float]]]) -> dict:
    """Return each kind's range of pHash distances and local differences to the originals: the margins."""
    ranges = {}
    for kind, values in distances.items():
        phash = [value[0] for value in values]
        local = [value[1] for value in values]
        ranges[kind] = {
            "phash_distance": {"min": min(phash), "max": max(phash)},
            "local_difference": {"min": round(min(local), 4), "max": round(max(local), 4)},
        }
    return ranges


def _default_policy() -> dict:
    from index_service.config import IndexConfig

    config = IndexConfig()
    return {
        "max_phash_distance": config.near_max_phash_distance,
        "max_local_difference": config.near_max_local_difference,
        "min_score": config.near_min_score,
    }


if __name__ == "__main__":
    sys.exit(main())
