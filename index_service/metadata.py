"""Limits and validation of item metadata: the caller's key/value pairs, at ingest and in UpdateMetadata.

Keys are non-empty printable strings (no control characters or line breaks), values any string;
both are measured in UTF-8 bytes. Too many keys, or a key or value that is too long, raises
TooLargeError (RESOURCE_EXHAUSTED). A malformed key, or a request whose fields contradict each
other, raises InvalidInputError (INVALID_ARGUMENT).
"""

import dataclasses
from collections.abc import Collection, Mapping

from imgsearch_common.errors import InvalidInputError, TooLargeError


@dataclasses.dataclass(frozen=True)
class MetadataLimits:
    """The maximum number of keys of one item's metadata, and the maximum UTF-8 bytes of a key and of a value."""

    max_keys: int = 64
    max_key_bytes: int = 256
    max_value_bytes: int = 4096


@dataclasses.dataclass(frozen=True)
class MetadataUpdate:
    """A change to one item's metadata: keys to set, keys to delete, or with replace, the whole new metadata."""

    set_values: Mapping[str, str]
    remove_keys: Collection[str]
    replace: bool = False

    def apply(self, current: Mapping[str, str], limits: MetadataLimits) -> dict[str, str]:
        """Return current changed by this update; raises TooLargeError when the result has too many keys."""
        updated = {} if self.replace else dict(current)
        for key in self.remove_keys:
            updated.pop(key, None)
        updated.update(self.set_values)
        if len(updated) > limits.max_keys:
            raise TooLargeError(
                f"the metadata would have {len(updated)} keys, above the limit of {limits.max_keys}; "
                "remove keys in the same update or set replace"
            )
        return updated


def validate_metadata(metadata: Mapping[str, str], limits: MetadataLimits) -> None:
    """Raise InvalidInputError or TooLargeError naming the first key or value that breaks the rules."""
    if len(metadata) > limits.max_keys:
        raise TooLargeError(f"metadata has {len(metadata)} keys, above the limit of {limits.max_keys}")
    for key, value in metadata.items():
        _validate_key(key, limits)
        value_bytes = len(value.encode("utf-8"))
        if value_bytes > limits.max_value_bytes:
            raise TooLargeError(
                f"the value of metadata key {key!r} is {value_bytes} bytes, above the limit of {limits.max_value_bytes}"
            )


def validate_update(update: MetadataUpdate, limits: MetadataLimits) -> None:
    """Raise InvalidInputError for contradicting fields, or the errors of validate_metadata for set_values."""
    if update.replace and update.remove_keys:
        raise InvalidInputError("remove_keys must be empty when replace is true, because replace drops every key not set")
    both = sorted(set(update.set_values) & set(update.remove_keys))
    if both:
        raise InvalidInputError(f"metadata key {both[0]!r} is both in set and in remove_keys; give it in only one")
    validate_metadata(update.set_values, limits)


def _validate_key(key: str, limits: MetadataLimits) -> None:
    if not key:
        raise InvalidInputError("a metadata key is empty; keys need at least one character")
    if not key.isprintable():
        raise InvalidInputError(f"metadata key {key!r} contains non-printable characters")
    key_bytes = len(key.encode("utf-8"))
    if key_bytes > limits.max_key_bytes:
        raise TooLargeError(f"metadata key {key[:40]!r}... is {key_bytes} bytes, above the limit of {limits.max_key_bytes}")
