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
from collections.abc import Sequence
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

    MALFORMED = "malformed"  # not msgpack, not a map, missing/invalid field, frame out of range
    VERSION_MISMATCH = "version_mismatch"  # header "v" differs from the server's version
    UNKNOWN_KIND = "unknown_kind"  # "kind" is not a request kind
    BAD_SHAPE = "bad_shape"  # an array has the wrong rank or size for its field
    BAD_DTYPE = "bad_dtype"  # unsupported dtype, or the wrong dtype for a field
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
    frames: Sequence[Any], max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
) -> dict[str, Any]:
    """Frames -> header map with arrays restored as read-only views (over the frames, or
    over the header's bytes for inline arrays).

    Raises WireError(TOO_LARGE) above ``max_message_bytes`` (all frames together) and
    WireError(MALFORMED / BAD_DTYPE / BAD_SHAPE) for anything that is not a valid message.
    Versions and kinds are not checked here (see ``check_header``).
    """
    if not frames:
        raise WireError(ErrorCode.MALFORMED, "empty message")
    views = [frame_bytes(f) for f in frames]
    total = sum(v.nbytes for v in views)
    if total > max_message_bytes:
        raise WireError(
            ErrorCode.TOO_LARGE, f"message is {total} bytes; the limit is {max_message_bytes}"
        )
    used: set[int] = set()

    def object_hook(value: dict[str, Any]) -> Any:  # msgpack calls this for every map
        if len(value) == 3 and value.keys() in _ARRAY_KEYS:
            return _decode_array(value, views, used)
        return value

    try:
        # strict_map_key keeps keys to str/bytes; unpackb bounds container sizes by the
        # buffer's length (a tiny header cannot claim a huge map) and nesting by its own
        # stack (StackError). Ext types are refused.
        header = msgpack.unpackb(
            views[0],
            raw=False,
            strict_map_key=True,
            ext_hook=_refuse_ext,
            object_hook=object_hook,
        )
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


def _request_id_of(packed: memoryview) -> int | None:
    """The ``id`` of a header whose arrays failed to decode (None if unreadable)."""
    try:
        header = msgpack.unpackb(packed, raw=False, strict_map_key=True, ext_hook=_refuse_ext)
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


def check_header(header: dict[str, Any], allowed: frozenset[Kind]) -> tuple[Kind, int, dict]:
    """Validate the envelope of a decoded message -> (kind, id, body)."""
    request_id = header.get("id")
    if type(request_id) is not int or not -(2**63) <= request_id < 2**64:
        raise WireError(ErrorCode.MALFORMED, "'id' must be an integer")
    version = header.get("v")
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
    return kind, request_id, body
