"""Request bodies kubectl sends as Kubernetes protobuf, decoded into the JSON objects the server stores.

kubectl's generator commands (`kubectl create namespace`, `create configmap`, `create service ...`)
post built-in objects as `application/vnd.kubernetes.protobuf`: the 4-byte magic `k8s\\0`, then a
`runtime.Unknown` (typeMeta = 1, raw = 2) whose `raw` is the object's own message. The lab speaks JSON
otherwise and answers in JSON (those requests also accept it); only the kinds those commands create are
decoded here, by their field numbers in Kubernetes' generated.proto files. Anything else raises
Unsupported (answered 415). Proto2 writes every optional field, so empty strings, zero numbers and empty
messages are dropped, as JSON's omitempty would have them.
"""

from __future__ import annotations

import base64
from typing import Any

MAGIC = b"k8s\x00"
CONTENT_TYPE = "application/vnd.kubernetes.protobuf"

# Per message: field number -> (JSON name, kind), kind one of "string", "varint", "bool", "bytes",
# "map" (map<string,string>), "bytesmap" (map<string,bytes>), "strings" (repeated string), or the name of
# another message; a trailing "[]" marks a repeated message.
Schema = dict[int, tuple[str, str]]
SCHEMAS: dict[str, Schema] = {
    "Unknown": {1: ("typeMeta", "TypeMeta"), 2: ("raw", "bytes")},
    "TypeMeta": {1: ("apiVersion", "string"), 2: ("kind", "string")},
    "ObjectMeta": {1: ("name", "string"), 2: ("generateName", "string"), 3: ("namespace", "string"),
                   11: ("labels", "map"), 12: ("annotations", "map"), 14: ("finalizers", "strings")},
    "Namespace": {1: ("metadata", "ObjectMeta"), 2: ("spec", "NamespaceSpec")},
    "NamespaceSpec": {1: ("finalizers", "strings")},
    "ConfigMap": {1: ("metadata", "ObjectMeta"), 2: ("data", "map"), 3: ("binaryData", "bytesmap"),
                  4: ("immutable", "bool")},
    "Service": {1: ("metadata", "ObjectMeta"), 2: ("spec", "ServiceSpec")},
    "ServiceSpec": {1: ("ports", "ServicePort[]"), 2: ("selector", "map"), 3: ("clusterIP", "string"),
                    4: ("type", "string"), 5: ("externalIPs", "strings"), 7: ("sessionAffinity", "string"),
                    8: ("loadBalancerIP", "string"), 9: ("loadBalancerSourceRanges", "strings"),
                    10: ("externalName", "string"), 11: ("externalTrafficPolicy", "string"),
                    12: ("healthCheckNodePort", "varint"), 13: ("publishNotReadyAddresses", "bool"),
                    17: ("ipFamilyPolicy", "string"), 18: ("clusterIPs", "strings"), 19: ("ipFamilies", "strings"),
                    22: ("internalTrafficPolicy", "string")},
    "ServicePort": {1: ("name", "string"), 2: ("protocol", "string"), 3: ("port", "varint"),
                    4: ("targetPort", "IntOrString"), 5: ("nodePort", "varint"), 6: ("appProtocol", "string")},
    "IntOrString": {1: ("type", "varint"), 2: ("intVal", "varint"), 3: ("strVal", "string")},
}
DECODED_KINDS = ("Namespace", "ConfigMap", "Service")


class Unsupported(ValueError):
    """A protobuf body of a kind (or shape) this module does not decode."""


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if at >= len(data):
            raise Unsupported("truncated varint")
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at += 1
        if not byte & 0x80:
            return value, at
        shift += 7


def _fields(data: bytes) -> list[tuple[int, int | bytes]]:
    """(field number, varint value or length-delimited bytes) in order."""
    fields: list[tuple[int, int | bytes]] = []
    at = 0
    while at < len(data):
        key, at = _varint(data, at)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, at = _varint(data, at)
            fields.append((number, value))
        elif wire == 2:
            length, at = _varint(data, at)
            if at + length > len(data):
                raise Unsupported("truncated field")
            fields.append((number, data[at:at + length]))
            at += length
        else:
            raise Unsupported(f"wire type {wire} is not used by the decoded kinds")
    return fields


def _entry(data: bytes) -> tuple[str, bytes]:
    key, value = "", b""
    for number, raw in _fields(data):
        if isinstance(raw, bytes):
            if number == 1:
                key = raw.decode()
            elif number == 2:
                value = raw
    return key, value


def decode_message(data: bytes, message: str) -> dict[str, Any]:
    """One message as a JSON object (see the module doc on what is dropped)."""
    schema = SCHEMAS[message]
    out: dict[str, Any] = {}
    for number, raw in _fields(data):
        if number not in schema:
            continue  # a field the lab does not keep
        name, kind = schema[number]
        if kind in ("varint", "bool"):
            if not isinstance(raw, int):
                raise Unsupported(f"{message}.{name}: not a number")
            if raw:
                out[name] = bool(raw) if kind == "bool" else raw
            continue
        if not isinstance(raw, bytes):
            raise Unsupported(f"{message}.{name}: not length-delimited")
        if kind == "string":
            if raw:
                out[name] = raw.decode()
        elif kind == "bytes":
            out[name] = raw
        elif kind == "strings":
            out.setdefault(name, []).append(raw.decode())
        elif kind == "map":
            key, value = _entry(raw)
            out.setdefault(name, {})[key] = value.decode()
        elif kind == "bytesmap":
            key, value = _entry(raw)
            out.setdefault(name, {})[key] = base64.b64encode(value).decode()
        elif kind.endswith("[]"):
            out.setdefault(name, []).append(decode_message(raw, kind[:-2]))
        elif kind == "IntOrString":
            either = decode_message(raw, kind)
            out[name] = either.get("strVal", "") if either.get("type") == 1 else either.get("intVal", 0)
        else:
            decoded = decode_message(raw, kind)
            if decoded:
                out[name] = decoded
    return out


def decode_object(body: bytes) -> dict[str, Any]:
    """A protobuf request body as the JSON object it stands for (Unsupported for other kinds)."""
    if not body.startswith(MAGIC):
        raise Unsupported("no Kubernetes protobuf magic")
    envelope = decode_message(body[len(MAGIC):], "Unknown")
    type_meta = envelope.get("typeMeta") or {}
    kind = type_meta.get("kind")
    if kind not in DECODED_KINDS:
        raise Unsupported(f"the lab decodes protobuf only for {', '.join(DECODED_KINDS)}, not {kind!r}")
    obj = decode_message(envelope.get("raw", b""), kind)
    return {"apiVersion": type_meta.get("apiVersion", "v1"), "kind": kind, **obj}
