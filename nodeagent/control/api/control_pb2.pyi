from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PodAssignment(_message.Message):
    __slots__ = ("uid", "ip", "namespace", "service_account", "netns", "transparent")
    UID_FIELD_NUMBER: _ClassVar[int]
    IP_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    SERVICE_ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    NETNS_FIELD_NUMBER: _ClassVar[int]
    TRANSPARENT_FIELD_NUMBER: _ClassVar[int]
    uid: str
    ip: str
    namespace: str
    service_account: str
    netns: str
    transparent: bool
    def __init__(self, uid: _Optional[str] = ..., ip: _Optional[str] = ..., namespace: _Optional[str] = ..., service_account: _Optional[str] = ..., netns: _Optional[str] = ..., transparent: _Optional[bool] = ...) -> None: ...

class TunnelUpdate(_message.Message):
    __slots__ = ("version", "agent_run", "full_state", "add", "remove")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    AGENT_RUN_FIELD_NUMBER: _ClassVar[int]
    FULL_STATE_FIELD_NUMBER: _ClassVar[int]
    ADD_FIELD_NUMBER: _ClassVar[int]
    REMOVE_FIELD_NUMBER: _ClassVar[int]
    version: int
    agent_run: str
    full_state: bool
    add: _containers.RepeatedCompositeFieldContainer[PodAssignment]
    remove: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, version: _Optional[int] = ..., agent_run: _Optional[str] = ..., full_state: _Optional[bool] = ..., add: _Optional[_Iterable[_Union[PodAssignment, _Mapping]]] = ..., remove: _Optional[_Iterable[str]] = ...) -> None: ...

class PodStatus(_message.Message):
    __slots__ = ("uid", "served", "reason")
    UID_FIELD_NUMBER: _ClassVar[int]
    SERVED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    uid: str
    served: bool
    reason: str
    def __init__(self, uid: _Optional[str] = ..., served: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class TunnelAck(_message.Message):
    __slots__ = ("node", "agent_run", "version", "pods", "pod_uid")
    NODE_FIELD_NUMBER: _ClassVar[int]
    AGENT_RUN_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PODS_FIELD_NUMBER: _ClassVar[int]
    POD_UID_FIELD_NUMBER: _ClassVar[int]
    node: str
    agent_run: str
    version: int
    pods: _containers.RepeatedCompositeFieldContainer[PodStatus]
    pod_uid: str
    def __init__(self, node: _Optional[str] = ..., agent_run: _Optional[str] = ..., version: _Optional[int] = ..., pods: _Optional[_Iterable[_Union[PodStatus, _Mapping]]] = ..., pod_uid: _Optional[str] = ...) -> None: ...

class InspectRequest(_message.Message):
    __slots__ = ("pod",)
    POD_FIELD_NUMBER: _ClassVar[int]
    pod: str
    def __init__(self, pod: _Optional[str] = ...) -> None: ...

class InspectReply(_message.Message):
    __slots__ = ("json",)
    JSON_FIELD_NUMBER: _ClassVar[int]
    json: str
    def __init__(self, json: _Optional[str] = ...) -> None: ...
