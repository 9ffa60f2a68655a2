from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Signal(_message.Message):
    __slots__ = ("signal_id", "rule_id", "rule_name", "severity", "trace_id", "span_ids", "message", "context", "mode", "detected_at", "violation_time", "service", "service_version", "rule_digest")
    SIGNAL_ID_FIELD_NUMBER: _ClassVar[int]
    RULE_ID_FIELD_NUMBER: _ClassVar[int]
    RULE_NAME_FIELD_NUMBER: _ClassVar[int]
    SEVERITY_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    SPAN_IDS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    DETECTED_AT_FIELD_NUMBER: _ClassVar[int]
    VIOLATION_TIME_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    SERVICE_VERSION_FIELD_NUMBER: _ClassVar[int]
    RULE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    signal_id: str
    rule_id: str
    rule_name: str
    severity: str
    trace_id: str
    span_ids: _containers.RepeatedScalarFieldContainer[str]
    message: str
    context: _struct_pb2.Struct
    mode: str
    detected_at: str
    violation_time: str
    service: str
    service_version: str
    rule_digest: str
    def __init__(self, signal_id: _Optional[str] = ..., rule_id: _Optional[str] = ..., rule_name: _Optional[str] = ..., severity: _Optional[str] = ..., trace_id: _Optional[str] = ..., span_ids: _Optional[_Iterable[str]] = ..., message: _Optional[str] = ..., context: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., mode: _Optional[str] = ..., detected_at: _Optional[str] = ..., violation_time: _Optional[str] = ..., service: _Optional[str] = ..., service_version: _Optional[str] = ..., rule_digest: _Optional[str] = ...) -> None: ...
