"""Filters on stored items: metadata conditions and uri prefixes, checked once and turned into a faiss ID selector."""

import dataclasses

import faiss
import numpy as np

from imgsearch_common.errors import InvalidInputError

# A filter names at most this many conditions and uri prefixes in all, and each condition this many values.
MAX_FILTER_TERMS = 64
MAX_VALUES_PER_CONDITION = 1024


@dataclasses.dataclass(frozen=True)
class MetadataCondition:
    """The item's metadata value for key must equal one of any_of; an empty any_of requires only that key is present."""

    key: str
    any_of: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class ItemFilter:
    """Conditions that an item must meet, all of them: metadata conditions, and a uri prefix when any are given."""

    metadata: tuple[MetadataCondition, ...] = ()
    uri_prefixes: tuple[str, ...] = ()

    @property
    def is_empty(self) -> bool:
        return not self.metadata and not self.uri_prefixes

    def check(self) -> None:
        """Raise InvalidInputError naming the first bad part: an empty key or prefix, or too many terms."""
        if len(self.metadata) + len(self.uri_prefixes) > MAX_FILTER_TERMS:
            raise InvalidInputError(
                f"filter has {len(self.metadata) + len(self.uri_prefixes)} conditions and uri prefixes, above the "
                f"limit of {MAX_FILTER_TERMS}"
            )
        for position, condition in enumerate(self.metadata):
            if not condition.key:
                raise InvalidInputError(f"filter.metadata[{position}].key is empty; name a metadata key")
            if len(condition.any_of) > MAX_VALUES_PER_CONDITION:
                raise InvalidInputError(
                    f"filter.metadata[{position}].any_of has {len(condition.any_of)} values, above the limit of "
                    f"{MAX_VALUES_PER_CONDITION}"
                )
        for position, prefix in enumerate(self.uri_prefixes):
            if not prefix:
                raise InvalidInputError(f"filter.uri_prefixes[{position}] is empty; give a prefix or leave it out")


@dataclasses.dataclass(frozen=True)
class Allowed:
    """The row ids that pass a filter, as a sorted int64 array, and a faiss selector that accepts only them."""

    row_ids: np.ndarray
    selector: object

    @classmethod
    def of(cls, row_ids: np.ndarray) -> "Allowed":
        ids = np.ascontiguousarray(np.sort(row_ids), dtype=np.int64)
        return cls(ids, faiss.IDSelectorBatch(ids))

    def contains(self, row_ids: np.ndarray) -> np.ndarray:
        """Return, per row id, whether it passes the filter."""
        return np.isin(np.asarray(row_ids, dtype=np.int64), self.row_ids)
