from imgsearch.common.v1 import common_pb2 as _common_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EmbedImagesRequest(_message.Message):
    __slots__ = ("image", "correlation_id")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    CORRELATION_ID_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    correlation_id: str
    def __init__(self, image: _Optional[bytes] = ..., correlation_id: _Optional[str] = ...) -> None: ...

class EmbedImagesResponse(_message.Message):
    __slots__ = ("correlation_id", "embedding", "error", "fingerprint")
    CORRELATION_ID_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    correlation_id: str
    embedding: _common_pb2.Embedding
    error: _common_pb2.ItemError
    fingerprint: _common_pb2.ImageFingerprint
    def __init__(self, correlation_id: _Optional[str] = ..., embedding: _Optional[_Union[_common_pb2.Embedding, _Mapping]] = ..., error: _Optional[_Union[_common_pb2.ItemError, _Mapping]] = ..., fingerprint: _Optional[_Union[_common_pb2.ImageFingerprint, _Mapping]] = ...) -> None: ...

class EmbedTextRequest(_message.Message):
    __slots__ = ("text",)
    TEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    def __init__(self, text: _Optional[str] = ...) -> None: ...

class EmbedTextResponse(_message.Message):
    __slots__ = ("embedding",)
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    embedding: _common_pb2.Embedding
    def __init__(self, embedding: _Optional[_Union[_common_pb2.Embedding, _Mapping]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetModelInfoResponse(_message.Message):
    __slots__ = ("model_id", "dim", "backend")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    dim: int
    backend: str
    def __init__(self, model_id: _Optional[str] = ..., dim: _Optional[int] = ..., backend: _Optional[str] = ...) -> None: ...
