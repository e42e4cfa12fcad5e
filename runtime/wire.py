"""The μ0 trace wire format: msgpack headers plus raw array frames (docs/protocol.md).

A message is a list of byte frames. Frame 0 is a msgpack map (the header). Every numpy
array inside it becomes a map ``{"dtype": str, "shape": [int...], ...}``: a small array
(under ``INLINE_MAX_BYTES``) carries its bytes inline as ``"data": bin``; a large one
names an extra frame, ``"frame": k`` (k >= 1), whose bytes travel uncopied. Decoding
builds read-only ``np.frombuffer`` views, so big images are never copied on either side.
Nothing here imports zmq, torch or pickle: this module is the contract.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from typing import Any

import msgpack
import numpy as np

PROTOCOL_VERSION = 2  # 2: arrays under INLINE_MAX_BYTES travel inside the header

# Arrays smaller than this travel inside the header (one copy, no extra frame): below it,
# ZeroMQ copies a frame anyway, and every frame costs a send, a receive and a wake-up.
INLINE_MAX_BYTES = 64 * 1024

# Messages whose frames add up to more than this are refused with TOO_LARGE. 64 MiB fits
# a few 4K RGB-D frames; servers may lower it.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024

# The header (frame 0) has a limit of its own, far below the message's: unpacking builds a
# Python object per msgpack value, so a 16 MiB header of empty maps once cost the server
# 4.65 s and 1.2 GB. Real headers are a few KiB (inline arrays are under INLINE_MAX_BYTES
# each); larger arrays belong in frames, which are never unpacked.
DEFAULT_MAX_HEADER_BYTES = 1024 * 1024
# Bounds while unpacking a header: elements per container (checked by msgpack before it
# allocates), and elements of all containers together (counted as each one completes).
# Real messages hold a few dozen; these bound the worst header to ~10^4 small objects.
MAX_CONTAINER_LEN = 1024
MAX_HEADER_ELEMENTS = 4096


class Kind(str, enum.Enum):
    """Message kinds. Requests go client -> server; replies carry the request's id."""

    # requests
    HELLO = "hello"
    PING = "ping"
    PREDICT = "predict"
    STATS = "stats"
    # replies
    HELLO_OK = "hello_ok"
    PONG = "pong"
    TRACE = "trace"
    SUPERSEDED = "superseded"
    STATS_OK = "stats_ok"
    ERROR = "error"


REQUEST_KINDS = frozenset({Kind.HELLO, Kind.PING, Kind.PREDICT, Kind.STATS})


class ErrorCode(str, enum.Enum):
    """Typed error codes of an ``error`` reply (and of ``WireError`` raised locally)."""

    MALFORMED = "malformed"  # not msgpack, not a map, missing/invalid/unknown field, bad frame
    VERSION_MISMATCH = "version_mismatch"  # header "v" differs from the server's version
    UNKNOWN_KIND = "unknown_kind"  # "kind" is not a request kind
    BAD_SHAPE = "bad_shape"  # an array has the wrong rank or size for its field
    BAD_DTYPE = "bad_dtype"  # unsupported dtype, or the wrong dtype for a field
    BAD_VALUE = "bad_value"  # right type and shape, values the model cannot use (NaN, fx <= 0)
    TOO_LARGE = "too_large"  # message above the size limit
    OVERLOADED = "overloaded"  # too many clients waiting; retry later
    RATE_LIMITED = "rate_limited"  # this client sends faster than the per-client limit
    INTERNAL = "internal"  # the model failed; details are in the server's log only


class WireError(Exception):
    """A protocol violation with a typed code; servers turn it into an ``error`` reply."""

    def __init__(self, code: ErrorCode | str, message: str, request_id: int | None = None) -> None:
        self.code = ErrorCode(code)
        self.message = message
        self.request_id = request_id  # set when the header was readable enough to carry one
        super().__init__(f"{self.code.value}: {message}")


# Wire dtype names -> numpy dtypes. Multi-byte types are little-endian on the wire.
SUPPORTED_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name).newbyteorder("<")
    for name in (
        "bool",
        "uint8",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint16",
        "uint32",
        "float16",
        "float32",
        "float64",
    )
}
_NAME_OF_KIND_SIZE = {(dt.kind, dt.itemsize): name for name, dt in SUPPORTED_DTYPES.items()}
# The key sets of an array map: bytes in an extra frame, or inline.
_ARRAY_KEYS = ({"dtype", "shape", "frame"}, {"dtype", "shape", "data"})


def dtype_name(dtype: np.dtype) -> str:
    """The wire name of a numpy dtype, or WireError(BAD_DTYPE) if it cannot travel."""
    name = _NAME_OF_KIND_SIZE.get((dtype.kind, dtype.itemsize))
    if name is None or dtype.fields is not None or dtype.subdtype is not None:
        raise WireError(ErrorCode.BAD_DTYPE, f"dtype {dtype} is not supported on the wire")
    return name


# ----------------------------------------------------------------------------- encode


def encode(header: dict[str, Any]) -> list[bytes | memoryview]:
    """Header map (arrays anywhere inside) -> frames. Map keys must be strings: a peer
    refuses any other. Large-array frames are memoryviews of the arrays (or of a
    contiguous little-endian copy when the array is not one already); send them with
    ``copy=False`` and keep the arrays alive until the send completes (pyzmq's zero-copy
    send holds a reference for you)."""
    buffers: list[memoryview] = []

    def default(value: Any) -> Any:  # msgpack calls this for every value it cannot pack
        if isinstance(value, np.ndarray):
            return _encode_array(value, buffers)
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, enum.Enum):
            return value.value
        raise WireError(ErrorCode.MALFORMED, f"cannot encode a {type(value).__name__}")

    try:
        packed = msgpack.packb(header, use_bin_type=True, default=default)
    except WireError:
        raise
    except (TypeError, ValueError) as exc:  # nested too deep, ints out of range
        raise WireError(ErrorCode.MALFORMED, f"cannot encode the header ({exc})") from None
    return [packed, *buffers]


def _encode_array(array: np.ndarray, buffers: list[memoryview]) -> dict[str, Any]:
    name = dtype_name(array.dtype)
    # Only copies when the array is strided or big-endian; the common case is a view.
    array = array.astype(SUPPORTED_DTYPES[name], order="C", copy=False)  # keeps 0-d arrays 0-d
    if array.nbytes < INLINE_MAX_BYTES:
        return {"dtype": name, "shape": list(array.shape), "data": array.tobytes()}
    buffers.append(memoryview(array.reshape(-1).view(np.uint8)))
    return {"dtype": name, "shape": list(array.shape), "frame": len(buffers)}


# ----------------------------------------------------------------------------- decode


def frame_bytes(frame: Any) -> memoryview:
    """A memoryview over a received frame: zmq.Frame (copy=False), bytes, or buffer."""
    buffer = getattr(frame, "buffer", frame)
    return memoryview(buffer).cast("B")


def decode(
    frames: Sequence[Any],
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
) -> dict[str, Any]:
    """Frames -> header map with arrays restored as read-only views (over the frames, or
    over the header's bytes for inline arrays).

    Raises WireError(TOO_LARGE) above ``max_message_bytes`` (all frames together) or a
    header above ``max_header_bytes``, and WireError(MALFORMED / BAD_DTYPE / BAD_SHAPE /
    BAD_VALUE) for anything that is not a valid message. Versions and kinds are not
    checked here (see ``check_header``).
    """
    if not frames:
        raise WireError(ErrorCode.MALFORMED, "empty message")
    views = [frame_bytes(f) for f in frames]
    total = sum(v.nbytes for v in views)
    if total > max_message_bytes:
        raise WireError(
            ErrorCode.TOO_LARGE, f"message is {total} bytes; the limit is {max_message_bytes}"
        )
    if views[0].nbytes > max_header_bytes:
        raise WireError(
            ErrorCode.TOO_LARGE,
            f"header is {views[0].nbytes} bytes; the limit is {max_header_bytes} "
            "(send large arrays as frames)",
        )
    used: set[int] = set()
    left = MAX_HEADER_ELEMENTS  # as _element_counter, inlined: these run for every container

    def object_hook(value: dict[str, Any]) -> Any:  # msgpack calls this for every map
        nonlocal left
        left -= len(value) + 1
        if left < 0:
            raise _too_many_values()
        if len(value) == 3 and value.keys() in _ARRAY_KEYS:
            return _decode_array(value, views, used)
        return value

    def list_hook(value: list[Any]) -> list[Any]:
        nonlocal left
        left -= len(value) + 1
        if left < 0:
            raise _too_many_values()
        return value

    try:
        header = _unpack(views[0], object_hook, list_hook)
        if not isinstance(header, dict):
            raise WireError(ErrorCode.MALFORMED, "header must be a msgpack map")
        if len(used) != len(views) - 1:
            raise WireError(
                ErrorCode.MALFORMED,
                f"message has {len(views) - 1} array frames; the header references {len(used)}",
            )
    except WireError as exc:
        # Let the error reply name the request it answers, when the header has a readable id.
        exc.request_id = _request_id_of(views[0])
        raise
    except Exception as exc:  # msgpack raises several unrelated types
        raise WireError(ErrorCode.MALFORMED, f"header is not valid msgpack ({exc})") from None
    return header


def _unpack(packed: memoryview, object_hook: Any, list_hook: Any) -> Any:
    # strict_map_key keeps keys to str/bytes; the max_*_len bounds are checked before a
    # container is allocated, the hooks count elements as containers complete, and
    # msgpack's own stack bounds nesting (StackError). Ext types are refused.
    return msgpack.unpackb(
        packed,
        raw=False,
        strict_map_key=True,
        ext_hook=_refuse_ext,
        object_hook=object_hook,
        list_hook=list_hook,
        max_array_len=MAX_CONTAINER_LEN,
        max_map_len=MAX_CONTAINER_LEN,
    )


def _too_many_values() -> WireError:
    return WireError(
        ErrorCode.MALFORMED, f"header holds more than {MAX_HEADER_ELEMENTS} msgpack values"
    )


def _element_counter() -> Callable[[Any], Any]:
    """A hook for every completed container that refuses a header once its containers
    hold more than MAX_HEADER_ELEMENTS values together."""
    left = MAX_HEADER_ELEMENTS

    def count(container: Any) -> Any:
        nonlocal left
        left -= len(container) + 1
        if left < 0:
            raise _too_many_values()
        return container

    return count


def _request_id_of(packed: memoryview) -> int | None:
    """The ``id`` of a header that failed to decode (None if unreadable)."""
    count = _element_counter()  # the same bounds as decode: a hostile header stays cheap
    try:
        header = _unpack(packed, count, count)
    except Exception:
        return None
    request_id = header.get("id") if isinstance(header, dict) else None
    return request_id if type(request_id) is int else None


def _refuse_ext(code: int, data: bytes) -> Any:
    raise WireError(ErrorCode.MALFORMED, "msgpack ext types are not allowed")


def _decode_array(spec: dict[str, Any], views: list[memoryview], used: set[int]) -> np.ndarray:
    name, shape = spec["dtype"], spec["shape"]
    dtype = SUPPORTED_DTYPES.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise WireError(ErrorCode.BAD_DTYPE, f"unsupported dtype {name!r}")
    if type(shape) is not list or len(shape) > 32:
        raise WireError(ErrorCode.BAD_SHAPE, f"shape must be a list of non-negative ints: {shape}")
    expected = dtype.itemsize
    for d in shape:  # a plain loop: this runs for every array of every message
        if type(d) is not int or d < 0:
            raise WireError(
                ErrorCode.BAD_SHAPE, f"shape must be a list of non-negative ints: {shape}"
            )
        expected *= d
    data = spec.get("data")
    if data is None:
        k = spec["frame"]
        if type(k) is not int or not 1 <= k < len(views):
            raise WireError(ErrorCode.MALFORMED, f"array frame {k!r} is not in this message")
        if k in used:
            raise WireError(ErrorCode.MALFORMED, f"array frame {k} is referenced twice")
        used.add(k)
        data = views[k]
    elif type(data) is not bytes:
        raise WireError(ErrorCode.MALFORMED, "inline array 'data' must be bin")
    if len(data) != expected:
        where = "inline data" if "data" in spec else f"frame {spec['frame']}"
        raise WireError(
            ErrorCode.BAD_SHAPE, f"{where} has {len(data)} bytes; {name}{shape} needs {expected}"
        )
    array = np.frombuffer(data, dtype=dtype).reshape(shape)
    if name == "bool" and array.size and array.view(np.uint8).max() > 1:
        # numpy keeps the raw byte, so a 2 would be "True" here and 2 in arithmetic
        raise WireError(ErrorCode.BAD_VALUE, f"bool array {shape} holds bytes other than 0/1")
    if array.flags.writeable:  # a view over a received frame (inline bytes are read-only)
        array.flags.writeable = False  # copy before mutating
    return array


# ----------------------------------------------------------------------------- headers


def request(kind: Kind, request_id: int, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """A request header map (before ``encode``)."""
    return {"v": PROTOCOL_VERSION, "kind": kind.value, "id": request_id, "body": body or {}}


def reply(
    kind: Kind,
    request_id: int | None,
    body: dict[str, Any] | None = None,
    timings: dict[str, float] | None = None,
) -> dict[str, Any]:
    """A reply header map (before ``encode``)."""
    return {
        "v": PROTOCOL_VERSION,
        "kind": kind.value,
        "id": request_id,
        "body": body or {},
        "timings": timings or {},
    }


def error_reply(
    code: ErrorCode, message: str, request_id: int | None, timings: dict[str, float] | None = None
) -> dict[str, Any]:
    body = {"code": code.value, "message": message}
    if code is ErrorCode.VERSION_MISMATCH:
        body["server_version"] = PROTOCOL_VERSION
    return reply(Kind.ERROR, request_id, body, timings)


# Request ids: non-negative and signed-64-bit, so every language's integer holds them.
MAX_REQUEST_ID = 2**63 - 1
_REQUEST_KEYS = frozenset({"v", "kind", "id", "body"})
# Body keys of each request kind; any other key is refused (docs/protocol.md, "Unknown keys").
_BODY_KEYS = {
    Kind.HELLO: frozenset(),
    Kind.PING: frozenset(),
    Kind.STATS: frozenset(),
    Kind.PREDICT: frozenset({"obs"}),
}


def check_header(header: dict[str, Any], allowed: frozenset[Kind]) -> tuple[Kind, int, dict]:
    """Validate the envelope of a decoded message -> (kind, id, body).

    Requests (``allowed`` holds request kinds) must carry exactly the known keys, in the
    header and in the body; replies may carry keys this peer does not know (a newer
    server's), and an error reply's id may be nil."""
    request_id = header.get("id")
    is_request = not allowed.isdisjoint(REQUEST_KINDS)
    if not (type(request_id) is int and 0 <= request_id <= MAX_REQUEST_ID):
        if is_request or request_id is not None:
            raise WireError(ErrorCode.MALFORMED, "'id' must be an integer in [0, 2^63 - 1]")
    version = header.get("v")
    if type(version) is not int:  # 2.0, True and "2" are not the integer 2
        raise WireError(ErrorCode.MALFORMED, f"'v' must be the integer {PROTOCOL_VERSION}")
    if version != PROTOCOL_VERSION:
        raise WireError(
            ErrorCode.VERSION_MISMATCH,
            f"protocol version {version!r}; this peer speaks {PROTOCOL_VERSION}",
        )
    try:
        kind = Kind(header.get("kind"))
    except ValueError:
        raise WireError(ErrorCode.UNKNOWN_KIND, f"unknown kind {header.get('kind')!r}") from None
    if kind not in allowed:
        raise WireError(ErrorCode.UNKNOWN_KIND, f"kind {kind.value!r} is not accepted here")
    body = header.get("body", {})
    if not isinstance(body, dict):
        raise WireError(ErrorCode.MALFORMED, "'body' must be a map")
    if is_request:
        for where, keys, known in (
            ("header", header.keys(), _REQUEST_KEYS),
            (f"{kind.value} body", body.keys(), _BODY_KEYS[kind]),
        ):
            if not keys <= known:
                unknown = sorted(map(str, keys - known))
                raise WireError(ErrorCode.MALFORMED, f"unknown keys in the {where}: {unknown}")
    return kind, request_id, body
