"""Tests of index_service.metadata: the limits and checks of item metadata and of metadata updates."""

import pytest

from imgsearch_common.errors import InvalidInputError, TooLargeError
from index_service.metadata import MetadataLimits, MetadataUpdate, validate_metadata, validate_update

_LIMITS = MetadataLimits(max_keys=3, max_key_bytes=8, max_value_bytes=10)


def test_metadata_within_limits():
    validate_metadata({"a": "", "é": "x" * 10, "key with": "ünïcode"[:5]}, _LIMITS)


@pytest.mark.parametrize(
    ("metadata", "error_type", "message"),
    [
        ({"a": "1", "b": "2", "c": "3", "d": "4"}, TooLargeError, "4 keys, above the limit of 3"),
        ({"": "1"}, InvalidInputError, "key is empty"),
        ({"line\nbreak": "1"}, InvalidInputError, "non-printable"),
        ({"tab\t": "1"}, InvalidInputError, "non-printable"),
        ({"k" * 9: "1"}, TooLargeError, "9 bytes, above the limit of 8"),
        ({"ééééé": "1"}, TooLargeError, "10 bytes, above the limit of 8"),
        ({"a": "v" * 11}, TooLargeError, "value of metadata key 'a' is 11 bytes"),
    ],
    ids=["too-many-keys", "empty-key", "newline-key", "tab-key", "long-key", "long-utf8-key", "long-value"],
)
def test_metadata_breaking_rules(metadata, error_type, message):
    with pytest.raises(error_type, match=message):
        validate_metadata(metadata, _LIMITS)


def test_update_sets_and_removes_keys():
    update = MetadataUpdate(set_values={"b": "new", "c": "3"}, remove_keys=["a", "missing"])

    assert update.apply({"a": "1", "b": "2"}, _LIMITS) == {"b": "new", "c": "3"}


def test_update_with_replace_keeps_only_set_keys():
    update = MetadataUpdate(set_values={"c": "3"}, remove_keys=[], replace=True)

    assert update.apply({"a": "1", "b": "2"}, _LIMITS) == {"c": "3"}
    assert MetadataUpdate({}, [], replace=True).apply({"a": "1"}, _LIMITS) == {}


def test_update_past_key_limit():
    update = MetadataUpdate(set_values={"c": "3", "d": "4"}, remove_keys=[])

    with pytest.raises(TooLargeError, match="would have 4 keys, above the limit of 3"):
        update.apply({"a": "1", "b": "2"}, _LIMITS)
    assert MetadataUpdate({"c": "3", "d": "4"}, ["a"]).apply({"a": "1", "b": "2"}, _LIMITS) == {
        "b": "2",
        "c": "3",
        "d": "4",
    }


@pytest.mark.parametrize(
    ("update", "message"),
    [
        (MetadataUpdate({"a": "1"}, ["b"], replace=True), "remove_keys must be empty when replace is true"),
        (MetadataUpdate({"a": "1", "b": "2"}, ["b"]), "'b' is both in set and in remove_keys"),
        (MetadataUpdate({"bad\x00key": "1"}, []), "non-printable"),
    ],
    ids=["replace-with-remove-keys", "key-in-both", "bad-key"],
)
def test_update_rejected(update, message):
    with pytest.raises(InvalidInputError, match=message):
        validate_update(update, _LIMITS)


def test_update_with_long_value_rejected():
    with pytest.raises(TooLargeError, match="above the limit of 10"):
        validate_update(MetadataUpdate({"a": "v" * 11}, []), _LIMITS)
