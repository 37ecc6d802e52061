from imgsearch.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MatchKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MATCH_KIND_UNSPECIFIED: _ClassVar[MatchKind]
    MATCH_KIND_EXACT: _ClassVar[MatchKind]
    MATCH_KIND_NEAR: _ClassVar[MatchKind]
    MATCH_KIND_SIMILAR: _ClassVar[MatchKind]

class OnDuplicate(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ON_DUPLICATE_UNSPECIFIED: _ClassVar[OnDuplicate]
    ON_DUPLICATE_ADD: _ClassVar[OnDuplicate]
    ON_DUPLICATE_SKIP: _ClassVar[OnDuplicate]
    ON_DUPLICATE_REJECT: _ClassVar[OnDuplicate]

class IngestStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INGEST_STATUS_UNSPECIFIED: _ClassVar[IngestStatus]
    INGEST_STATUS_ADDED: _ClassVar[IngestStatus]
    INGEST_STATUS_ALREADY_PRESENT: _ClassVar[IngestStatus]
    INGEST_STATUS_FAILED: _ClassVar[IngestStatus]
MATCH_KIND_UNSPECIFIED: MatchKind
MATCH_KIND_EXACT: MatchKind
MATCH_KIND_NEAR: MatchKind
MATCH_KIND_SIMILAR: MatchKind
ON_DUPLICATE_UNSPECIFIED: OnDuplicate
ON_DUPLICATE_ADD: OnDuplicate
ON_DUPLICATE_SKIP: OnDuplicate
ON_DUPLICATE_REJECT: OnDuplicate
INGEST_STATUS_UNSPECIFIED: IngestStatus
INGEST_STATUS_ADDED: IngestStatus
INGEST_STATUS_ALREADY_PRESENT: IngestStatus
INGEST_STATUS_FAILED: IngestStatus

class NearDuplicatePolicy(_message.Message):
    __slots__ = ("max_phash_distance", "max_local_difference", "min_score")
    MAX_PHASH_DISTANCE_FIELD_NUMBER: _ClassVar[int]
    MAX_LOCAL_DIFFERENCE_FIELD_NUMBER: _ClassVar[int]
    MIN_SCORE_FIELD_NUMBER: _ClassVar[int]
    max_phash_distance: int
    max_local_difference: float
    min_score: float
    def __init__(self, max_phash_distance: _Optional[int] = ..., max_local_difference: _Optional[float] = ..., min_score: _Optional[float] = ...) -> None: ...

class IngestImagesRequest(_message.Message):
    __slots__ = ("image", "embedding", "item_id", "uri", "metadata", "on_duplicate", "duplicate_match")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    ON_DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_MATCH_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    embedding: _common_pb2.Embedding
    item_id: str
    uri: str
    metadata: _containers.ScalarMap[str, str]
    on_duplicate: OnDuplicate
    duplicate_match: MatchKind
    def __init__(self, image: _Optional[bytes] = ..., embedding: _Optional[_Union[_common_pb2.Embedding, _Mapping]] = ..., item_id: _Optional[str] = ..., uri: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., on_duplicate: _Optional[_Union[OnDuplicate, str]] = ..., duplicate_match: _Optional[_Union[MatchKind, str]] = ...) -> None: ...

class IngestImagesResponse(_message.Message):
    __slots__ = ("item_id", "status", "error", "uri", "duplicate_of_item_id", "duplicate_match")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_OF_ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_MATCH_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    status: IngestStatus
    error: _common_pb2.ItemError
    uri: str
    duplicate_of_item_id: str
    duplicate_match: MatchKind
    def __init__(self, item_id: _Optional[str] = ..., status: _Optional[_Union[IngestStatus, str]] = ..., error: _Optional[_Union[_common_pb2.ItemError, _Mapping]] = ..., uri: _Optional[str] = ..., duplicate_of_item_id: _Optional[str] = ..., duplicate_match: _Optional[_Union[MatchKind, str]] = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("image", "embedding", "item_id", "text", "k", "min_score", "near_duplicate_policy", "search_params", "filter")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    MIN_SCORE_FIELD_NUMBER: _ClassVar[int]
    NEAR_DUPLICATE_POLICY_FIELD_NUMBER: _ClassVar[int]
    SEARCH_PARAMS_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    embedding: _common_pb2.Embedding
    item_id: str
    text: str
    k: int
    min_score: float
    near_duplicate_policy: NearDuplicatePolicy
    search_params: SearchParams
    filter: Filter
    def __init__(self, image: _Optional[bytes] = ..., embedding: _Optional[_Union[_common_pb2.Embedding, _Mapping]] = ..., item_id: _Optional[str] = ..., text: _Optional[str] = ..., k: _Optional[int] = ..., min_score: _Optional[float] = ..., near_duplicate_policy: _Optional[_Union[NearDuplicatePolicy, _Mapping]] = ..., search_params: _Optional[_Union[SearchParams, _Mapping]] = ..., filter: _Optional[_Union[Filter, _Mapping]] = ...) -> None: ...

class SearchParams(_message.Message):
    __slots__ = ("nprobe", "ef_search")
    NPROBE_FIELD_NUMBER: _ClassVar[int]
    EF_SEARCH_FIELD_NUMBER: _ClassVar[int]
    nprobe: int
    ef_search: int
    def __init__(self, nprobe: _Optional[int] = ..., ef_search: _Optional[int] = ...) -> None: ...

class Filter(_message.Message):
    __slots__ = ("metadata", "uri_prefixes")
    METADATA_FIELD_NUMBER: _ClassVar[int]
    URI_PREFIXES_FIELD_NUMBER: _ClassVar[int]
    metadata: _containers.RepeatedCompositeFieldContainer[MetadataCondition]
    uri_prefixes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, metadata: _Optional[_Iterable[_Union[MetadataCondition, _Mapping]]] = ..., uri_prefixes: _Optional[_Iterable[str]] = ...) -> None: ...

class MetadataCondition(_message.Message):
    __slots__ = ("key", "any_of")
    KEY_FIELD_NUMBER: _ClassVar[int]
    ANY_OF_FIELD_NUMBER: _ClassVar[int]
    key: str
    any_of: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, key: _Optional[str] = ..., any_of: _Optional[_Iterable[str]] = ...) -> None: ...

class SearchStreamResponse(_message.Message):
    __slots__ = ("response", "error")
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    response: SearchResponse
    error: _common_pb2.ItemError
    def __init__(self, response: _Optional[_Union[SearchResponse, _Mapping]] = ..., error: _Optional[_Union[_common_pb2.ItemError, _Mapping]] = ...) -> None: ...

class Neighbour(_message.Message):
    __slots__ = ("item_id", "score", "uri", "metadata", "width", "height", "sha256", "match", "phash_distance", "local_difference")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    MATCH_FIELD_NUMBER: _ClassVar[int]
    PHASH_DISTANCE_FIELD_NUMBER: _ClassVar[int]
    LOCAL_DIFFERENCE_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    score: float
    uri: str
    metadata: _containers.ScalarMap[str, str]
    width: int
    height: int
    sha256: str
    match: MatchKind
    phash_distance: int
    local_difference: float
    def __init__(self, item_id: _Optional[str] = ..., score: _Optional[float] = ..., uri: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., sha256: _Optional[str] = ..., match: _Optional[_Union[MatchKind, str]] = ..., phash_distance: _Optional[int] = ..., local_difference: _Optional[float] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("neighbours", "model_id")
    NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    neighbours: _containers.RepeatedCompositeFieldContainer[Neighbour]
    model_id: str
    def __init__(self, neighbours: _Optional[_Iterable[_Union[Neighbour, _Mapping]]] = ..., model_id: _Optional[str] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatsResponse(_message.Message):
    __slots__ = ("item_count", "dim", "model_id", "index_type", "index_device", "index_kind", "index_memory_bytes", "nlist", "default_search_effort")
    ITEM_COUNT_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_TYPE_FIELD_NUMBER: _ClassVar[int]
    INDEX_DEVICE_FIELD_NUMBER: _ClassVar[int]
    INDEX_KIND_FIELD_NUMBER: _ClassVar[int]
    INDEX_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    NLIST_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_SEARCH_EFFORT_FIELD_NUMBER: _ClassVar[int]
    item_count: int
    dim: int
    model_id: str
    index_type: str
    index_device: str
    index_kind: str
    index_memory_bytes: int
    nlist: int
    default_search_effort: int
    def __init__(self, item_count: _Optional[int] = ..., dim: _Optional[int] = ..., model_id: _Optional[str] = ..., index_type: _Optional[str] = ..., index_device: _Optional[str] = ..., index_kind: _Optional[str] = ..., index_memory_bytes: _Optional[int] = ..., nlist: _Optional[int] = ..., default_search_effort: _Optional[int] = ...) -> None: ...

class FindDuplicatesRequest(_message.Message):
    __slots__ = ("kinds", "near_duplicate_policy", "min_similar_score", "k", "filter")
    KINDS_FIELD_NUMBER: _ClassVar[int]
    NEAR_DUPLICATE_POLICY_FIELD_NUMBER: _ClassVar[int]
    MIN_SIMILAR_SCORE_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    kinds: _containers.RepeatedScalarFieldContainer[MatchKind]
    near_duplicate_policy: NearDuplicatePolicy
    min_similar_score: float
    k: int
    filter: Filter
    def __init__(self, kinds: _Optional[_Iterable[_Union[MatchKind, str]]] = ..., near_duplicate_policy: _Optional[_Union[NearDuplicatePolicy, _Mapping]] = ..., min_similar_score: _Optional[float] = ..., k: _Optional[int] = ..., filter: _Optional[_Union[Filter, _Mapping]] = ...) -> None: ...

class DuplicateMember(_message.Message):
    __slots__ = ("item_id", "uri", "score", "phash_distance", "local_difference", "width", "height")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    PHASH_DISTANCE_FIELD_NUMBER: _ClassVar[int]
    LOCAL_DIFFERENCE_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    uri: str
    score: float
    phash_distance: int
    local_difference: float
    width: int
    height: int
    def __init__(self, item_id: _Optional[str] = ..., uri: _Optional[str] = ..., score: _Optional[float] = ..., phash_distance: _Optional[int] = ..., local_difference: _Optional[float] = ..., width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class DuplicateGroup(_message.Message):
    __slots__ = ("kind", "members")
    KIND_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    kind: MatchKind
    members: _containers.RepeatedCompositeFieldContainer[DuplicateMember]
    def __init__(self, kind: _Optional[_Union[MatchKind, str]] = ..., members: _Optional[_Iterable[_Union[DuplicateMember, _Mapping]]] = ...) -> None: ...

class FindDuplicatesProgress(_message.Message):
    __slots__ = ("items_done", "item_count")
    ITEMS_DONE_FIELD_NUMBER: _ClassVar[int]
    ITEM_COUNT_FIELD_NUMBER: _ClassVar[int]
    items_done: int
    item_count: int
    def __init__(self, items_done: _Optional[int] = ..., item_count: _Optional[int] = ...) -> None: ...

class FindDuplicatesSummary(_message.Message):
    __slots__ = ("item_count", "group_counts", "grouped_item_count")
    class GroupCountsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    ITEM_COUNT_FIELD_NUMBER: _ClassVar[int]
    GROUP_COUNTS_FIELD_NUMBER: _ClassVar[int]
    GROUPED_ITEM_COUNT_FIELD_NUMBER: _ClassVar[int]
    item_count: int
    group_counts: _containers.ScalarMap[str, int]
    grouped_item_count: int
    def __init__(self, item_count: _Optional[int] = ..., group_counts: _Optional[_Mapping[str, int]] = ..., grouped_item_count: _Optional[int] = ...) -> None: ...

class FindDuplicatesResponse(_message.Message):
    __slots__ = ("progress", "group", "summary")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    progress: FindDuplicatesProgress
    group: DuplicateGroup
    summary: FindDuplicatesSummary
    def __init__(self, progress: _Optional[_Union[FindDuplicatesProgress, _Mapping]] = ..., group: _Optional[_Union[DuplicateGroup, _Mapping]] = ..., summary: _Optional[_Union[FindDuplicatesSummary, _Mapping]] = ...) -> None: ...

class RemoveItemsRequest(_message.Message):
    __slots__ = ("item_ids",)
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, item_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class RemoveItemsResponse(_message.Message):
    __slots__ = ("removed_count", "not_found_item_ids")
    REMOVED_COUNT_FIELD_NUMBER: _ClassVar[int]
    NOT_FOUND_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    removed_count: int
    not_found_item_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, removed_count: _Optional[int] = ..., not_found_item_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class UpdateMetadataRequest(_message.Message):
    __slots__ = ("item_id", "set", "remove_keys", "replace")
    class SetEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SET_FIELD_NUMBER: _ClassVar[int]
    REMOVE_KEYS_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    set: _containers.ScalarMap[str, str]
    remove_keys: _containers.RepeatedScalarFieldContainer[str]
    replace: bool
    def __init__(self, item_id: _Optional[str] = ..., set: _Optional[_Mapping[str, str]] = ..., remove_keys: _Optional[_Iterable[str]] = ..., replace: _Optional[bool] = ...) -> None: ...

class UpdateMetadataResponse(_message.Message):
    __slots__ = ("metadata",)
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    METADATA_FIELD_NUMBER: _ClassVar[int]
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...
