"""Searching queries that arrive together in one faiss call, which costs far less per query than one call each."""

import dataclasses
import threading
from collections.abc import Sequence

import numpy as np

from index_service.vector_index import Hit, VectorIndex


@dataclasses.dataclass(frozen=True)
class IndexQuery:
    """One query for the vector index: a unit vector, the number of hits, and the search's settings.

    effort is the nprobe or ef_search (None: the index's default); selector, a faiss IDSelector,
    limits the search to the row ids that it accepts. Queries with the same effort and selector
    are searched together.
    """

    vector: np.ndarray
    k: int
    effort: int | None = None
    selector: object = None


class _Waiter:
    """A caller's queries, and the event that signals that their hits are ready or that the caller must lead."""

    def __init__(self, queries: Sequence[IndexQuery]):
        self.queries = list(queries)
        self.hits: list[list[Hit]] | None = None
        self.error: BaseException | None = None
        self.leads = False
        self.event = threading.Event()


class SearchBatcher:
    """Searches the vector index for many callers at once, without a thread of its own.

    A caller that finds no search running searches at once, with whatever queries are waiting
    (its own among them). Callers that arrive meanwhile wait. When the running search ends, the
    first of them leads the next search, for all queries that have gathered by then. A lone query
    therefore waits for nothing, and under load the queries of many callers share each faiss call.
    """

    def __init__(self, index: VectorIndex, max_batch: int = 256):
        self._index = index
        self._max_batch = max_batch
        self._lock = threading.Lock()
        self._waiting: list[_Waiter] = []
        self._running = False

    def search(self, queries: Sequence[IndexQuery]) -> list[list[Hit]]:
        """Return the hits of each query, in order; raises what the index raised for them."""
        if not queries:
            return []
        waiter = _Waiter(queries)
        with self._lock:
            self._waiting.append(waiter)
            waiter.leads = not self._running
            self._running = True
        while True:
            if waiter.leads:
                waiter.leads = False
                self._run_once()
            waiter.event.wait()
            waiter.event.clear()
            if waiter.hits is not None or waiter.error is not None:
                break
        if waiter.error is not None:
            raise waiter.error
        return waiter.hits

    def _run_once(self) -> None:
        """Search the waiting callers' queries, then hand the lead to the next waiting caller."""
        with self._lock:
            batch, size = [], 0
            while self._waiting and (not batch or size + len(self._waiting[0].queries) <= self._max_batch):
                size += len(self._waiting[0].queries)
                batch.append(self._waiting.pop(0))
        try:
            _search_together(self._index, batch)
        finally:
            with self._lock:
                if self._waiting:
                    self._waiting[0].leads = True
                    self._waiting[0].event.set()
                else:
                    self._running = False


def _search_together(index: VectorIndex, batch: list[_Waiter]) -> None:
    """Run one faiss search per (effort, selector) group of the batch's queries and hand each waiter its hits."""
    groups: dict[tuple, list[tuple[_Waiter, int]]] = {}
    for waiter in batch:
        waiter.hits = [[] for _ in waiter.queries]
        for position, query in enumerate(waiter.queries):
            groups.setdefault((query.effort, id(query.selector)), []).append((waiter, position))
    failed: dict[int, BaseException] = {}
    for members in groups.values():
        queries = [waiter.queries[position] for waiter, position in members]
        try:
            hits = index.search(
                np.stack([query.vector for query in queries]),
                max(query.k for query in queries),
                effort=queries[0].effort,
                selector=queries[0].selector,
            )
        except Exception as error:  # noqa: BLE001 - handed to the callers, who raise it
            for waiter, _ in members:
                failed[id(waiter)] = error
            continue
        for (waiter, position), query, found in zip(members, queries, hits):
            waiter.hits[position] = found[: query.k]
    for waiter in batch:
        if id(waiter) in failed:
            waiter.hits, waiter.error = None, failed[id(waiter)]
        waiter.event.set()
