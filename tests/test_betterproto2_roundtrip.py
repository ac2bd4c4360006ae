"""Every flowfabric.v1 message round-trips byte-for-byte between protobuf and betterproto2.

The messages are built from the descriptor pool, so a message or field added to any proto is
covered without touching this file. Maps carry one entry each: protobuf does not promise an
order for map entries on the wire, so with more than one entry equal messages may encode
differently. betterproto2 writes fields in declaration order, protobuf in field-number order:
for a message that declares a field after a higher-numbered one (CreateExecutionRequest today,
and the messages that carry it, such as CreateExecutionsRequest)
the bytes hold the same fields in another order, so there the check is that protobuf re-encodes
betterproto2's bytes to its own, byte for byte (docs/betterproto2.md).
"""

from __future__ import annotations

import importlib
import pkgutil

import pytest
from google.protobuf import message
from google.protobuf.descriptor import Descriptor, FieldDescriptor

import flowfabric.v1
from flowfabric.bp2 import v1 as bp  # noqa: F401 - registers the classes in the pool
from flowfabric.bp2.message_pool import default_message_pool

_SCALARS = {
    FieldDescriptor.CPPTYPE_INT32: -7,
    FieldDescriptor.CPPTYPE_INT64: -(2**40),
    FieldDescriptor.CPPTYPE_UINT32: 7,
    FieldDescriptor.CPPTYPE_UINT64: 2**40,
    FieldDescriptor.CPPTYPE_DOUBLE: 1.5,
    FieldDescriptor.CPPTYPE_FLOAT: 0.25,
    FieldDescriptor.CPPTYPE_BOOL: True,
}


def _modules() -> list[object]:
    return [
        importlib.import_module(f"flowfabric.v1.{m.name}")
        for m in pkgutil.iter_modules(flowfabric.v1.__path__)
        if m.name.endswith("_pb2")
    ]


def _messages() -> list[Descriptor]:
    found: dict[str, Descriptor] = {}
    for module in _modules():
        for desc in module.DESCRIPTOR.message_types_by_name.values():  # type: ignore[attr-defined]
            stack = [desc]
            while stack:
                d = stack.pop()
                if not d.GetOptions().map_entry:
                    found[d.full_name] = d
                stack.extend(d.nested_types)
    return [found[name] for name in sorted(found)]


def _value(field: FieldDescriptor, index: int) -> object:
    if field.cpp_type == FieldDescriptor.CPPTYPE_STRING:
        if field.type == FieldDescriptor.TYPE_BYTES:
            return bytes([index + 1, 0, 255])
        return f"{field.name}-{index}-ü"
    if field.cpp_type == FieldDescriptor.CPPTYPE_ENUM:
        values = field.enum_type.values
        return values[min(1 + index, len(values) - 1)].number
    return _SCALARS[field.cpp_type]


def fill(msg: message.Message, depth: int = 0, choice: int = 0) -> message.Message:
    """Set every field of ``msg`` (one member per oneof, the ``choice``-th); 3 levels deep."""
    desc = msg.DESCRIPTOR
    for field in desc.fields:
        oneof = field.containing_oneof
        if oneof is not None and not oneof.name.startswith("_"):  # a real oneof, not `optional`
            members = oneof.fields
            if field is not members[choice % len(members)]:
                continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key_f, val_f = (
                field.message_type.fields_by_name["key"],
                field.message_type.fields_by_name["value"],
            )
            target = getattr(msg, field.name)
            key = _value(key_f, 0)
            if val_f.message_type is not None:
                if depth < 3:
                    fill(target[key], depth + 1)
            else:
                target[key] = _value(val_f, 0)
        elif field.message_type is not None:
            if depth >= 3:
                continue
            if field.is_repeated:
                for _ in range(2):
                    fill(getattr(msg, field.name).add(), depth + 1)
            else:
                fill(getattr(msg, field.name), depth + 1, choice)
        elif field.is_repeated:
            getattr(msg, field.name).extend(_value(field, i) for i in range(2))
        else:
            setattr(msg, field.name, _value(field, 0))
    return msg


def _pb_class(desc: Descriptor) -> type[message.Message]:
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(desc)


MESSAGES = _messages()


def _nested_out_of_order(desc: Descriptor, seen: frozenset[str] = frozenset()) -> bool:
    """A message field (at any depth) whose type declares fields out of number order: the
    bytes then differ inside it (e.g. CreateExecutionsRequest's CreateExecutionRequest items)."""
    for field in desc.fields:
        sub = field.message_type
        if sub is None or sub.full_name in seen:
            continue
        numbers = [f.number for f in sub.fields]
        if numbers != sorted(numbers) or _nested_out_of_order(sub, seen | {desc.full_name}):
            return True
    return False


def test_every_message_is_generated_both_ways() -> None:
    bp_names = {
        url.removeprefix("type.googleapis.com/") for url in default_message_pool.url_to_type
    }
    assert {d.full_name for d in MESSAGES} <= bp_names
    assert len(MESSAGES) > 100


@pytest.mark.parametrize("choice", [0, 1, 2])
def test_round_trip_byte_for_byte(choice: int) -> None:
    checked = 0
    for desc in MESSAGES:
        pb_cls = _pb_class(desc)
        original = fill(pb_cls(), choice=choice)
        raw = original.SerializeToString(deterministic=True)
        bp_cls = default_message_pool.url_to_type[f"type.googleapis.com/{desc.full_name}"]
        dataclass_msg = bp_cls.parse(raw)
        back = bytes(dataclass_msg)
        numbers = [f.number for f in desc.fields]
        if numbers != sorted(numbers):
            assert back != raw, desc.full_name  # declaration order, as documented
        elif not _nested_out_of_order(desc):
            assert back == raw, desc.full_name  # protobuf -> betterproto2 -> the same bytes
        reparsed = pb_cls.FromString(back)
        assert reparsed == original, desc.full_name  # and back to protobuf
        assert reparsed.SerializeToString(deterministic=True) == raw, desc.full_name
        assert bp_cls.parse(back) == dataclass_msg, desc.full_name
        checked += 1
    assert checked == len(MESSAGES)


def test_defaults_encode_empty_on_both_sides() -> None:
    for desc in MESSAGES:
        bp_cls = default_message_pool.url_to_type[f"type.googleapis.com/{desc.full_name}"]
        assert bytes(bp_cls()) == _pb_class(desc)().SerializeToString(), desc.full_name
