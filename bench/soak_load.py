"""The soak run's clients: searchers, ingesters and removers in threads, and what they record."""

import collections
import dataclasses
import io
import pathlib
import threading
import time

import numpy as np
from PIL import Image

from imgsearch_client.client import ClientError, IndexClient, IngestItem

SEARCH_KINDS = ("image", "item_id", "embedding")


@dataclasses.dataclass(frozen=True)
class SoakSettings:
    """Settings of one soak run: its duration, the clients of each type, and the bounds that it checks."""

    duration_s: float = 60.0
    searchers: int = 4
    ingesters: int = 2
    removers: int = 1
    # The removers remove at most this share of the acknowledged adds, so that the collection grows.
    remove_fraction: float = 0.25
    # Images ingested before the clients start, so that the first searches find items.
    preload_images: int = 64
    # Images sent in each IngestImages stream.
    stream_images: int = 4
    k: int = 10
    # RSS samples taken before warmup_s leave the growth check: imports, thread pools and first allocations.
    # None takes a quarter of the duration, at most 10 s.
    warmup_s: float | None = None
    max_rss_growth_mib: float = 100.0
    # Deadline of every call, an ingest stream included.
    rpc_timeout_s: float = 10.0
    # Maximum number of calls that one client makes, whatever the duration.
    max_calls_per_client: int = 100_000
    # "hash" keeps the embed service cheap, so that the index service is the bottleneck. "onnx" runs model_dir.
    embed_backend: str = "hash"
    model_dir: pathlib.Path = pathlib.Path("models/tiny-clip-random")
    seed: int = 0

    def __post_init__(self):
        if self.duration_s <= 0:
            raise ValueError(f"duration_s must be above 0, got {self.duration_s}")
        if not 0 <= self.effective_warmup_s < self.duration_s:
            raise ValueError(f"warmup_s must be from 0 to below duration_s ({self.duration_s}), got {self.warmup_s}")
        if self.embed_backend not in ("hash", "onnx"):
            raise ValueError(f"embed_backend must be hash or onnx, got {self.embed_backend!r}")

    @property
    def effective_warmup_s(self) -> float:
        return self.warmup_s if self.warmup_s is not None else min(10.0, self.duration_s / 4)


@dataclasses.dataclass(frozen=True)
class StoredImage:
    """An image whose add was acknowledged, with the uri and metadata that it was sent with."""

    image: bytes
    uri: str
    metadata: dict[str, str]


@dataclasses.dataclass
class Removal:
    """When a removal of one item was sent, and when its response came back (None until it did)."""

    sent_at: float
    acknowledged_at: float | None = None


@dataclasses.dataclass(frozen=True)
class SearchRecord:
    """One finished search: its query, its times on the monotonic clock, and its result or error code."""

    kind: str
    query_item_id: str
    started_at: float
    finished_at: float
    result_item_ids: tuple[str, ...] = ()
    error_code: str = ""
    error_message: str = ""


class Ledger:
    """The items that the load saw acknowledged as added, and the removals that it sent."""

    def __init__(self):
        self._lock = threading.Lock()
        self._added: dict[str, StoredImage] = {}
        self._live: list[str] = []
        self._live_position: dict[str, int] = {}
        self._removals: dict[str, Removal] = {}
        self._removed: list[str] = []

    def record_added(self, item_id: str, stored: StoredImage) -> None:
        with self._lock:
            self._added[item_id] = stored
            self._live_position[item_id] = len(self._live)
            self._live.append(item_id)

    def take_for_removal(self, rng: np.random.Generator, count: int, remove_fraction: float) -> list[str]:
        """Pick up to count live items to remove and note the time, or none while enough are removed."""
        with self._lock:
            if len(self._removals) >= remove_fraction * len(self._added) or not self._live:
                return []
            item_ids = [self._live[int(rng.integers(len(self._live)))] for _ in range(count)]
            item_ids = list(dict.fromkeys(item_ids))
            sent_at = time.monotonic()
            for item_id in item_ids:
                self._drop_live(item_id)
                self._removals[item_id] = Removal(sent_at)
            return item_ids

    def record_removed(self, item_ids: list[str], acknowledged_at: float) -> None:
        with self._lock:
            for item_id in item_ids:
                self._removals[item_id].acknowledged_at = acknowledged_at
                self._removed.append(item_id)

    def pick(self, rng: np.random.Generator, removed: bool) -> tuple[str, StoredImage] | None:
        """Pick a live item, or an item whose removal was acknowledged. Returns None when there is none."""
        with self._lock:
            item_ids = self._removed if removed else self._live
            if not item_ids:
                return None
            item_id = item_ids[int(rng.integers(len(item_ids)))]
            return item_id, self._added[item_id]

    def stored(self, item_id: str) -> StoredImage | None:
        with self._lock:
            return self._added.get(item_id)

    def removal(self, item_id: str) -> Removal | None:
        with self._lock:
            return self._removals.get(item_id)

    def counts(self) -> tuple[int, int]:
        """Return the numbers of acknowledged adds and acknowledged removals."""
        with self._lock:
            return len(self._added), len(self._removed)

    def _drop_live(self, item_id: str) -> None:
        position = self._live_position.pop(item_id)
        last = self._live.pop()
        if last != item_id:
            self._live[position] = last
            self._live_position[last] = position


class Recorder:
    """Latencies per RPC, work done per client type, unexpected errors and finished searches, from many threads."""

    def __init__(self):
        self._lock = threading.Lock()
        self.latencies_s: dict[str, list[float]] = collections.defaultdict(list)
        self.work: collections.Counter = collections.Counter()
        self.errors: collections.Counter = collections.Counter()
        self.error_examples: dict[tuple[str, str], str] = {}
        self.searches: list[SearchRecord] = []
        self.metadata_mismatches: list[dict] = []

    def record_latency(self, rpc: str, seconds: float) -> None:
        with self._lock:
            self.latencies_s[rpc].append(seconds)

    def count(self, unit: str, amount: int = 1) -> None:
        with self._lock:
            self.work[unit] += amount

    def record_error(self, rpc: str, code: str, message: str) -> None:
        with self._lock:
            self.errors[(rpc, code)] += 1
            self.error_examples.setdefault((rpc, code), message)

    def record_search(self, search: SearchRecord) -> None:
        with self._lock:
            self.searches.append(search)

    def record_metadata_mismatch(self, item_id: str, expected: StoredImage, uri: str, metadata: dict) -> None:
        with self._lock:
            self.metadata_mismatches.append(
                {"item_id": item_id, "expected_uri": expected.uri, "uri": uri,
                 "expected_metadata": expected.metadata, "metadata": metadata}
            )


@dataclasses.dataclass(frozen=True)
class Load:
    """State that every client thread shares."""

    addr: str
    settings: SoakSettings
    ledger: Ledger
    recorder: Recorder
    deadline: float
    dim: int


def noise_png(rng: np.random.Generator) -> bytes:
    """Return a small PNG of uniform RGB noise, 24 to 48 pixels a side, distinct for each draw."""
    side = int(rng.integers(24, 49))
    pixels = rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def new_items(rng: np.random.Generator, name_prefix: str, first: int, count: int, choose_ids: bool) -> list[IngestItem]:
    """Build count fresh images numbered from first, with metadata.

    With choose_ids the images get item_ids, and otherwise the server assigns them.
    """
    items = []
    for sequence in range(first, first + count):
        name = f"{name_prefix}-{sequence:06d}"
        items.append(IngestItem(
            image=noise_png(rng),
            item_id=name if choose_ids else "",
            uri=f"mem://{name}.png",
            metadata={"client": name_prefix, "sequence": str(sequence), "source": "soak"},
        ))
    return items


def ingest_stream(client: IndexClient, items: list[IngestItem], load: Load) -> None:
    """Send items in one IngestImages stream and record each acknowledged add."""
    started = time.monotonic()
    try:
        outcomes = list(client.ingest(items, timeout_s=load.settings.rpc_timeout_s))
    except ClientError as error:
        load.recorder.record_error("IngestImages", error.code, error.message)
        return
    load.recorder.record_latency("IngestImages", time.monotonic() - started)
    load.recorder.count("ingest_streams")

    for item, outcome in zip(items, outcomes, strict=True):
        if outcome.status == "added":
            load.ledger.record_added(outcome.item_id, StoredImage(item.image, item.uri, dict(item.metadata)))
            load.recorder.count("images_added")
        else:
            # Every image is fresh and distinct, so already_present is as unexpected as failed.
            code = outcome.error_code or outcome.status.upper()
            load.recorder.record_error("IngestImages item", code, outcome.error_message or outcome.uri)


def _ingest_loop(load: Load, client_number: int) -> None:
    rng = np.random.default_rng([load.settings.seed, 1, client_number])
    with IndexClient(load.addr, timeout_s=load.settings.rpc_timeout_s) as client:
        for call in range(load.settings.max_calls_per_client):
            if time.monotonic() >= load.deadline:
                return
            # Odd-numbered ingesters choose item_ids, and even-numbered ones let the server assign them.
            items = new_items(rng, f"ingester{client_number}", call * load.settings.stream_images,
                              load.settings.stream_images, choose_ids=client_number % 2 == 1)
            ingest_stream(client, items, load)


def _search_query(kind: str, load: Load, rng: np.random.Generator) -> tuple[str, dict] | None:
    """Choose a query of kind and return the item_id that it names ("" for none) and the search arguments.

    Half the image queries and a fifth of the item_id queries name removed items, which no search
    may return once their removal is acknowledged. Returns None while no item fits.
    """
    if kind == "embedding":
        vector = rng.standard_normal(load.dim).astype(np.float32)
        return "", {"embedding": vector.tolist()}
    removed_share = 0.5 if kind == "image" else 0.2
    picked = load.ledger.pick(rng, removed=bool(rng.random() < removed_share)) or load.ledger.pick(rng, removed=False)
    if picked is None:
        return None
    item_id, stored = picked
    return item_id, ({"image": stored.image} if kind == "image" else {"item_id": item_id})


def _search_once(client: IndexClient, load: Load, rng: np.random.Generator) -> None:
    kind = SEARCH_KINDS[int(rng.integers(len(SEARCH_KINDS)))]
    query = _search_query(kind, load, rng)
    if query is None:
        time.sleep(0.01)
        return
    query_item_id, arguments = query

    started = time.monotonic()
    try:
        neighbours = client.search(k=load.settings.k, **arguments)
    except ClientError as error:
        load.recorder.record_search(SearchRecord(kind, query_item_id, started, time.monotonic(),
                                                 error_code=error.code, error_message=error.message))
        return
    finished = time.monotonic()
    load.recorder.record_latency(f"Search ({kind})", finished - started)
    load.recorder.count("searches")
    load.recorder.record_search(
        SearchRecord(kind, query_item_id, started, finished, tuple(n.item_id for n in neighbours))
    )
    for neighbour in neighbours:
        expected = load.ledger.stored(neighbour.item_id)
        if expected is not None and (neighbour.uri, neighbour.metadata) != (expected.uri, expected.metadata):
            load.recorder.record_metadata_mismatch(neighbour.item_id, expected, neighbour.uri, neighbour.metadata)


def _search_loop(load: Load, client_number: int) -> None:
    rng = np.random.default_rng([load.settings.seed, 2, client_number])
    with IndexClient(load.addr, timeout_s=load.settings.rpc_timeout_s) as client:
        for _ in range(load.settings.max_calls_per_client):
            if time.monotonic() >= load.deadline:
                return
            _search_once(client, load, rng)


def _remove_once(client: IndexClient, load: Load, rng: np.random.Generator) -> None:
    item_ids = load.ledger.take_for_removal(rng, int(rng.integers(1, 4)), load.settings.remove_fraction)
    if not item_ids:
        time.sleep(0.01)
        return

    started = time.monotonic()
    try:
        result = client.remove_items(item_ids)
    except ClientError as error:
        load.recorder.record_error("RemoveItems", error.code, error.message)
        return
    acknowledged_at = time.monotonic()
    load.recorder.record_latency("RemoveItems", acknowledged_at - started)
    load.recorder.count("remove_calls")

    not_found = set(result.not_found_item_ids)
    if not_found:
        # Each id was acknowledged as added and is removed once, so the service must know it.
        load.recorder.record_error("RemoveItems", "NOT_FOUND", f"acknowledged items not found: {sorted(not_found)}")
    removed = [item_id for item_id in item_ids if item_id not in not_found]
    if result.removed_count != len(removed):
        load.recorder.record_error("RemoveItems", "WRONG_COUNT",
                                   f"removed_count {result.removed_count} for {len(removed)} items found")
    load.ledger.record_removed(removed, acknowledged_at)
    load.recorder.count("items_removed", len(removed))


def _remove_loop(load: Load, client_number: int) -> None:
    rng = np.random.default_rng([load.settings.seed, 3, client_number])
    with IndexClient(load.addr, timeout_s=load.settings.rpc_timeout_s) as client:
        for _ in range(load.settings.max_calls_per_client):
            if time.monotonic() >= load.deadline:
                return
            _remove_once(client, load, rng)


def run_clients(load: Load) -> None:
    """Run every client in its own thread until the deadline, and wait for them.

    Raises RuntimeError when a client raised something other than ClientError, or did not stop.
    """
    loops = (
        [(_search_loop, number) for number in range(load.settings.searchers)]
        + [(_ingest_loop, number) for number in range(load.settings.ingesters)]
        + [(_remove_loop, number) for number in range(load.settings.removers)]
    )
    failures: list[tuple[str, BaseException]] = []

    def run(loop, number: int) -> None:
        try:
            loop(load, number)
        except Exception as error:  # noqa: BLE001 - re-raised in the main thread below
            failures.append((threading.current_thread().name, error))

    threads = [threading.Thread(target=run, args=(loop, number), name=f"soak{loop.__name__}-{number}", daemon=True)
               for loop, number in loops]
    for thread in threads:
        thread.start()
    for thread in threads:
        # A client stops at the deadline or, inside a call, at most rpc_timeout_s later.
        thread.join(max(0.0, load.deadline - time.monotonic()) + load.settings.rpc_timeout_s + 5.0)
        if thread.is_alive():
            raise RuntimeError(f"client thread {thread.name} did not stop after the deadline")
    if failures:
        name, error = failures[0]
        raise RuntimeError(f"client thread {name} failed: {error!r}") from error


def preload(addr: str, settings: SoakSettings, ledger: Ledger, recorder: Recorder) -> int:
    """Ingest settings.preload_images images before the clients start, and return the collection's dim."""
    rng = np.random.default_rng([settings.seed, 0])
    load = Load(addr, settings, ledger, recorder, deadline=0.0, dim=0)
    with IndexClient(addr, timeout_s=settings.rpc_timeout_s) as client:
        for first in range(0, settings.preload_images, settings.stream_images):
            count = min(settings.stream_images, settings.preload_images - first)
            ingest_stream(client, new_items(rng, "preload", first, count, choose_ids=False), load)
        dim = client.stats()["dim"]
    if not dim:
        raise RuntimeError("the collection has no dim after the preload; see the index service's log")
    return dim
