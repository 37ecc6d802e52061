from imgsearch.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class IngestStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INGEST_STATUS_UNSPECIFIED: _ClassVar[IngestStatus]
    INGEST_STATUS_ADDED: _ClassVar[IngestStatus]
    INGEST_STATUS_ALREADY_PRESENT: _ClassVar[IngestStatus]
    INGEST_STATUS_FAILED: _ClassVar[IngestStatus]
INGEST_STATUS_UNSPECIFIED: IngestStatus
INGEST_STATUS_ADDED: IngestStatus
INGEST_STATUS_ALREADY_PRESENT: IngestStatus
INGEST_STATUS_FAILED: IngestStatus

class IngestImagesRequest(_message.Message):
    __slots__ = ("image", "item_id", "uri", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    item_id: str
    uri: str
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, image: _Optional[bytes] = ..., item_id: _Optional[str] = ..., uri: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class IngestImagesResponse(_message.Message):
    __slots__ = ("item_id", "status", "error", "uri")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    status: IngestStatus
    error: _common_pb2.ItemError
    uri: str
    def __init__(self, item_id: _Optional[str] = ..., status: _Optional[_Union[IngestStatus, str]] = ..., error: _Optional[_Union[_common_pb2.ItemError, _Mapping]] = ..., uri: _Optional[str] = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("image", "embedding", "item_id", "k", "min_score")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    MIN_SCORE_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    embedding: _common_pb2.Embedding
    item_id: str
    k: int
    min_score: float
    def __init__(self, image: _Optional[bytes] = ..., embedding: _Optional[_Union[_common_pb2.Embedding, _Mapping]] = ..., item_id: _Optional[str] = ..., k: _Optional[int] = ..., min_score: _Optional[float] = ...) -> None: ...

class Neighbour(_message.Message):
    __slots__ = ("item_id", "score", "uri", "metadata", "width", "height", "sha256")
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
    item_id: str
    score: float
    uri: str
    metadata: _containers.ScalarMap[str, str]
    width: int
    height: int
    sha256: str
    def __init__(self, item_id: _Optional[str] = ..., score: _Optional[float] = ..., uri: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

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
    __slots__ = ("item_count", "dim", "model_id", "index_type", "index_device")
    ITEM_COUNT_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_TYPE_FIELD_NUMBER: _ClassVar[int]
    INDEX_DEVICE_FIELD_NUMBER: _ClassVar[int]
    item_count: int
    dim: int
    model_id: str
    index_type: str
    index_device: str
    def __init__(self, item_count: _Optional[int] = ..., dim: _Optional[int] = ..., model_id: _Optional[str] = ..., index_type: _Optional[str] = ..., index_device: _Optional[str] = ...) -> None: ...
