"""The end-to-end demo: start both services, ingest COCO128, search with one image, draw the result."""

import argparse
import json
import pathlib
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter

from tqdm import tqdm

from imgsearch_client.client import ClientError, IndexClient, IngestItem, check_health
from imgsearch_client.commands import neighbours_to_json
from imgsearch_client.dataset import DatasetError, locate_coco128
from imgsearch_client.files import find_images
from imgsearch_client.grid import draw_grid

_STARTUP_TIMEOUT_S = 120.0
_STOP_TIMEOUT_S = 30.0


def main(argv: list[str] | None = None) -> int:
    """Run the demo and return its exit status."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", default="", help="folder of COCO128 images (default: download it)")
    parser.add_argument("--model-dir", default="models/tiny-clip-random", help="CLIP ONNX model folder")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("demo-output"), help="output folder")
    parser.add_argument("--query", help="query image (default: the first image of the dataset)")
    parser.add_argument("-k", type=int, default=5, help="number of neighbours to show")
    args = parser.parse_args(argv)
    try:
        folder = locate_coco128(args.dataset, args.out / "cache")
    except DatasetError as error:
        print(f"demo: {error}", file=sys.stderr)
        return 1
    _warn_if_random(pathlib.Path(args.model_dir))
    with _Services(args.out, args.model_dir) as services:
        return _run(services.index_addr, folder, args)


def _warn_if_random(model_dir: pathlib.Path) -> None:
    metadata_path = model_dir / "imgsearch-model.json"
    metadata = json.loads(metadata_path.read_text()) if metadata_path.is_file() else {}
    if metadata.get("random_weights"):
        print(f"NOTE: {model_dir} is a tiny CLIP with random weights, made for tests. Exact copies still "
              "score 1.0, but the other neighbours are NOT semantically meaningful. For real results run "
              "`imgsearch fetch-model --out models/ViT-B-32` on a machine with internet and pass "
              "MODEL_DIR=models/ViT-B-32.\n", flush=True)


def _run(index_addr: str, folder: pathlib.Path, args) -> int:
    files = list(find_images([folder]))
    query_path = pathlib.Path(args.query) if args.query else files[0]
    with IndexClient(index_addr, timeout_s=60.0) as client:
        try:
            first = _ingest(client, files, "ingest")
            again = _ingest(client, files, "ingest again")
            neighbours = client.search(image=query_path.read_bytes(), k=args.k)
            stats = client.stats()
        except ClientError as error:
            print(f"demo: {error}", file=sys.stderr)
            return 1
    print(f"first pass: {dict(first)}; second pass: {dict(again)}")
    print(f"collection: {stats['item_count']} items, model {stats['model_id']}, dim {stats['dim']}")
    print(f"\nquery: {query_path}")
    for rank, neighbour in enumerate(neighbours, start=1):
        print(f"{rank:3d}  score {neighbour.score:.4f}  {pathlib.Path(neighbour.uri).name}")

    _write_outputs(args.out, query_path, neighbours, stats)
    return 1 if first["failed"] or again["failed"] else 0


def _ingest(client: IndexClient, files: list[pathlib.Path], label: str) -> Counter:
    counts = Counter({"added": 0, "already_present": 0, "failed": 0})
    items = (IngestItem(image=path.read_bytes(), uri=str(path.resolve())) for path in files)
    with tqdm(total=len(files), unit="image", desc=label, file=sys.stdout) as bar:
        for outcome in client.ingest(items):
            counts[outcome.status] += 1
            if outcome.failed:
                bar.write(f"failed: {outcome.uri}: {outcome.error_code}: {outcome.error_message}")
            bar.update()
    return counts


def _write_outputs(out: pathlib.Path, query_path: pathlib.Path, neighbours, stats) -> None:
    document = {"query": str(query_path.resolve()), "model_id": stats["model_id"], **neighbours_to_json(neighbours)}
    (out / "search.json").write_text(json.dumps(document, indent=2) + "\n")
    tiles = [(pathlib.Path(n.uri).read_bytes(), f"{n.score:.4f}") for n in neighbours]
    draw_grid(query_path.read_bytes(), tiles, out / "grid.png")
    print(f"\nwrote {out / 'search.json'} and {out / 'grid.png'}")


class _Services:
    """Runs the embed and index services as two child processes on 127.0.0.1 free ports."""

    def __init__(self, out: pathlib.Path, model_dir: str):
        self._out = out
        self._model_dir = model_dir
        self._processes: list[subprocess.Popen] = []
        self.embed_addr = f"127.0.0.1:{_free_port()}"
        self.index_addr = f"127.0.0.1:{_free_port()}"

    def __enter__(self) -> "_Services":
        data_dir = self._out / "index-data"
        shutil.rmtree(data_dir, ignore_errors=True)
        self._out.mkdir(parents=True, exist_ok=True)
        self._start("embed", ["--listen", self.embed_addr, "--backend", "onnx", "--model-dir", self._model_dir])
        self._start("index", ["--listen", self.index_addr, "--embed-addr", self.embed_addr,
                              "--data-dir", str(data_dir)])
        try:
            # Each check names its service, so that another server that took a port first cannot pass it.
            self._wait_serving(self.embed_addr, "imgsearch.embed.v1.EmbedService")
            self._wait_serving(self.index_addr, "imgsearch.index.v1.IndexService")
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        if not self._stop():
            raise RuntimeError(f"a service did not stop cleanly; see the logs in {self._out}")

    def _start(self, service: str, flags: list[str]) -> None:
        log_file = open(self._out / f"{service}.log", "wb")  # noqa: SIM115 - closed with the process
        command = [sys.executable, "-m", "imgsearch_client.cli", "serve", service, *flags]
        self._processes.append(subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT))
        log_file.close()
        print(f"started {service} service: pid {self._processes[-1].pid}, log {self._out / (service + '.log')}")

    def _wait_serving(self, addr: str, service: str) -> None:
        deadline = time.monotonic() + _STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            for process in self._processes:
                if process.poll() is not None:
                    raise RuntimeError(f"a service exited with status {process.returncode}; see {self._out}/*.log")
            try:
                if check_health(addr, service, timeout_s=2.0) == "SERVING":
                    return
            except ClientError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"service at {addr} was not SERVING after {_STARTUP_TIMEOUT_S:.0f} s")

    def _stop(self) -> bool:
        for process in self._processes:
            process.terminate()
        clean = True
        for process in self._processes:
            try:
                clean &= process.wait(_STOP_TIMEOUT_S) == 0
            except subprocess.TimeoutExpired:
                process.kill()
                clean = False
        print("stopped both services")
        return clean


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
