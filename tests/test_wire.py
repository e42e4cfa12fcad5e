"""The wire format alone: array round trips for every dtype, strict rejection of the rest."""

from __future__ import annotations

import pickle

import msgpack
import numpy as np
import pytest

from runtime import wire
from runtime.wire import ErrorCode, Kind, WireError


@pytest.mark.parametrize("name", sorted(wire.SUPPORTED_DTYPES))
@pytest.mark.parametrize("shape", [(), (0,), (7,), (3, 4, 5), (128, 128, 4)])
def test_round_trip_every_dtype(name: str, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    array = np.asarray(rng.uniform(-100, 100, size=shape)).astype(name)
    frames = wire.encode(wire.request(Kind.PREDICT, 5, {"obs": {"x": array}}))
    # Small arrays travel inside the header, large ones in a frame of their own.
    assert len(frames) == (2 if array.nbytes >= wire.INLINE_MAX_BYTES else 1)
    out = wire.decode(frames)["body"]["obs"]["x"]
    assert out.dtype == np.dtype(name) and out.shape == shape
    np.testing.assert_array_equal(out, array)
    assert not out.flags.writeable  # a view over the message buffer


def test_the_inline_limit_is_where_frames_begin() -> None:
    below = np.zeros(wire.INLINE_MAX_BYTES - 1, np.uint8)
    at = np.zeros(wire.INLINE_MAX_BYTES, np.uint8)
    frames = wire.encode({"below": below, "at": at})
    assert len(frames) == 2 and memoryview(frames[1]).nbytes == wire.INLINE_MAX_BYTES
    header = msgpack.unpackb(frames[0])
    assert header["below"]["data"] == bytes(below) and header["at"]["frame"] == 1


def test_array_frames_are_views_not_copies() -> None:
    image = np.arange(224 * 224 * 3, dtype=np.uint8).reshape(224, 224, 3)
    frames = wire.encode({"img": image})
    assert np.shares_memory(np.frombuffer(frames[1], np.uint8), image)
    decoded = wire.decode(frames)["img"]
    assert np.shares_memory(decoded, image)  # decode is zero-copy too


def test_strided_and_big_endian_arrays_travel_as_little_endian_contiguous() -> None:
    base = np.arange(24, dtype=">i4").reshape(4, 6)
    view = base[:, ::2]
    for array in (view, np.tile(view, (1000, 1))):  # inline and in a frame of its own
        out = wire.decode(wire.encode({"a": array}))["a"]
        np.testing.assert_array_equal(out, array)
        assert out.dtype == np.dtype("<i4")


def test_nested_values_and_several_arrays() -> None:
    msg = {
        "a": [np.ones(3, np.float32), {"b": np.zeros((2, 2), bool)}],
        "s": "hi",
        "n": None,
        "f": 1.5,
    }
    out = wire.decode(wire.encode(msg))
    np.testing.assert_array_equal(out["a"][0], np.ones(3, np.float32))
    assert out["a"][1]["b"].dtype == bool and out["s"] == "hi" and out["n"] is None


@pytest.mark.parametrize(
    "array", [np.array([object()], dtype=object), np.zeros(2, np.complex64), np.zeros(2, np.uint64)]
)
def test_unsupported_dtypes_are_refused_when_sending(array: np.ndarray) -> None:
    with pytest.raises(WireError) as err:
        wire.encode({"x": array})
    assert err.value.code is ErrorCode.BAD_DTYPE


@pytest.mark.parametrize("value", [object(), {1, 2}, 2**70])
def test_non_wire_python_objects_are_refused(value: object) -> None:
    with pytest.raises(WireError) as err:
        wire.encode({"x": value})
    assert err.value.code is ErrorCode.MALFORMED


def test_deep_nesting_is_refused_both_ways() -> None:
    deep: list = []
    for _ in range(2000):
        deep = [deep]
    with pytest.raises(WireError) as err:
        wire.encode({"x": deep})
    assert err.value.code is ErrorCode.MALFORMED
    with pytest.raises(WireError) as err:  # msgpack's own stack bounds what a peer may send
        wire.decode([b"\x91" * 5000 + b"\xc0"])
    assert err.value.code is ErrorCode.MALFORMED


def _header(body: dict) -> bytes:
    return msgpack.packb({"v": wire.PROTOCOL_VERSION, "kind": "predict", "id": 9, "body": body})


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        ([], ErrorCode.MALFORMED),
        ([b"\xc1garbage"], ErrorCode.MALFORMED),
        ([pickle.dumps({"v": 1})], ErrorCode.MALFORMED),
        ([msgpack.packb([1, 2])], ErrorCode.MALFORMED),
        ([msgpack.packb({1: 2})], ErrorCode.MALFORMED),  # non-string keys
        ([msgpack.packb(msgpack.ExtType(1, b"x"))], ErrorCode.MALFORMED),
        ([_header({"x": {"dtype": "uint8", "shape": [4], "frame": 1}})], ErrorCode.MALFORMED),
        (
            [_header({"x": {"dtype": "uint8", "shape": [4], "frame": 1}}), b"abc"],
            ErrorCode.BAD_SHAPE,
        ),
        (
            [_header({"x": {"dtype": "object", "shape": [1], "frame": 1}}), b"a"],
            ErrorCode.BAD_DTYPE,
        ),
        (
            [_header({"x": {"dtype": "<f4", "shape": [1], "frame": 1}}), b"abcd"],
            ErrorCode.BAD_DTYPE,
        ),
        ([_header({"x": {"dtype": "uint8", "shape": [-1], "frame": 1}}), b""], ErrorCode.BAD_SHAPE),
        (
            [_header({"x": {"dtype": "uint8", "shape": "4", "frame": 1}}), b"abcd"],
            ErrorCode.BAD_SHAPE,
        ),
        ([_header({"x": {"dtype": "uint8", "shape": [1], "frame": 0}}), b"a"], ErrorCode.MALFORMED),
        ([_header({}), b"unreferenced"], ErrorCode.MALFORMED),
        ([_header({"x": {"dtype": "uint8", "shape": [4], "data": b"abc"}})], ErrorCode.BAD_SHAPE),
        ([_header({"x": {"dtype": "uint8", "shape": [3], "data": "abc"}})], ErrorCode.MALFORMED),
        ([_header({"x": {"dtype": "bfloat16", "shape": [1], "data": b"ab"}})], ErrorCode.BAD_DTYPE),
    ],
)
def test_malformed_messages_raise_typed_errors(frames: list[bytes], code: ErrorCode) -> None:
    with pytest.raises(WireError) as err:
        wire.decode(frames)
    assert err.value.code is code


def test_decode_error_names_the_request_when_it_can() -> None:
    with pytest.raises(WireError) as err:
        wire.decode([_header({"x": {"dtype": "uint8", "shape": [4], "frame": 1}}), b"abc"])
    assert err.value.request_id == 9


def test_two_arrays_cannot_share_a_frame() -> None:
    spec = {"dtype": "uint8", "shape": [1], "frame": 1}
    with pytest.raises(WireError) as err:
        wire.decode([_header({"a": spec, "b": spec}), b"x"])
    assert err.value.code is ErrorCode.MALFORMED


def test_size_limit_counts_all_frames() -> None:
    frames = wire.encode({"a": np.zeros(600, np.uint8), "b": np.zeros(600, np.uint8)})
    wire.decode(frames, max_message_bytes=2000)
    with pytest.raises(WireError) as err:
        wire.decode(frames, max_message_bytes=1000)
    assert err.value.code is ErrorCode.TOO_LARGE


def test_check_header_versions_and_kinds() -> None:
    kind, rid, body = wire.check_header(wire.request(Kind.PING, 3), wire.REQUEST_KINDS)
    assert (kind, rid, body) == (Kind.PING, 3, {})
    v = wire.PROTOCOL_VERSION
    bad = [
        ({"v": 1, "kind": "ping", "id": 1}, ErrorCode.VERSION_MISMATCH),  # a version-1 peer
        ({"v": v, "kind": "launch", "id": 1}, ErrorCode.UNKNOWN_KIND),
        ({"v": v, "kind": "trace", "id": 1}, ErrorCode.UNKNOWN_KIND),  # a reply kind as a request
        ({"v": v, "kind": "ping", "id": "1"}, ErrorCode.MALFORMED),
        ({"v": v, "kind": "ping", "id": 1, "body": [1]}, ErrorCode.MALFORMED),
    ]
    for header, code in bad:
        with pytest.raises(WireError) as err:
            wire.check_header(header, wire.REQUEST_KINDS)
        assert err.value.code is code, header


def test_error_reply_of_version_mismatch_names_the_server_version() -> None:
    header = wire.error_reply(ErrorCode.VERSION_MISMATCH, "old client", 4)
    assert header["body"] == {
        "code": "version_mismatch",
        "message": "old client",
        "server_version": wire.PROTOCOL_VERSION,
    }


def test_versions_ids_and_unknown_keys_follow_one_rule() -> None:
    v = wire.PROTOCOL_VERSION
    ok = {"v": v, "kind": "predict", "id": 2**63 - 1, "body": {"obs": {}}}
    assert wire.check_header(ok, wire.REQUEST_KINDS)[1] == 2**63 - 1
    bad = [
        ({"v": 2.0, "kind": "ping", "id": 1}, ErrorCode.MALFORMED),  # not the integer 2
        ({"v": True, "kind": "ping", "id": 1}, ErrorCode.MALFORMED),
        ({"kind": "ping", "id": 1}, ErrorCode.MALFORMED),  # no v
        ({"v": 3, "kind": "ping", "id": 1}, ErrorCode.VERSION_MISMATCH),
        ({"v": v, "kind": "ping", "id": -1}, ErrorCode.MALFORMED),
        ({"v": v, "kind": "ping", "id": 2**63}, ErrorCode.MALFORMED),
        ({"v": v, "kind": "ping", "id": 1, "trace_me": True}, ErrorCode.MALFORMED),
        ({"v": v, "kind": "ping", "id": 1, "body": {"x": 1}}, ErrorCode.MALFORMED),
        ({"v": v, "kind": "predict", "id": 1, "body": {"obs": {}, "x": 1}}, ErrorCode.MALFORMED),
    ]
    for header, code in bad:
        with pytest.raises(WireError) as err:
            wire.check_header(header, wire.REQUEST_KINDS)
        assert err.value.code is code, header
    # Replies: unknown keys are a newer server's fields, and an error may carry no id.
    reply = {**wire.error_reply(ErrorCode.MALFORMED, "x", None), "new_field": 1}
    assert wire.check_header(reply, frozenset({Kind.ERROR}))[0] is Kind.ERROR


def test_header_limits_refuse_big_and_crowded_headers() -> None:
    with pytest.raises(WireError) as err:
        wire.decode([msgpack.packb({"x": b"a" * 2000})], max_header_bytes=1000)
    assert err.value.code is ErrorCode.TOO_LARGE
    crowded = msgpack.packb({"v": 2, "x": [[1] * 100] * 50})  # 5,000 values in 51 lists
    with pytest.raises(WireError) as err:
        wire.decode([crowded])
    assert err.value.code is ErrorCode.MALFORMED and "4096" in err.value.message
    wire.decode([msgpack.packb({"v": 2, "x": [[1] * 100] * 30})])  # 3,000 values pass
