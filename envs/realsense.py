"""Intel RealSense RGB-D cameras (pyrealsense2): live devices, recordings, software devices.

One `RealSenseCamera` per device. It streams depth and colour, aligns depth to the colour
image (so one set of intrinsics describes both; `DepthToColor` keeps holes as holes,
rs.align on request), reads the colour intrinsics and the depth
unit from the device (a D405 counts depth in 0.1 mm, a D435 in 1 mm: never assume one),
and stamps every frame with its capture time and the time it reached this process. A
background thread keeps reading; `read()` waits for the next frame, `latest()` returns the
newest one without waiting.

Three kinds of source read through the same code:

- a live device, picked by serial number (`find_realsense()` lists them);
- a recording (`.bag` from realsense-viewer, or `.db3` from `rs.recorder`), played back
  through the SDK as if it were the device (`RealSenseConfig(recording=path)`);
- an `rs.software_device` that a program feeds frames into (`SoftwareRealSense`), which is
  how the tests exercise the SDK's alignment, depth units and timestamps without hardware.

Frames follow the project's conventions (DESIGN.md): RGB uint8 with row 0 at the top,
depth in metres along the optical axis (0 where the camera measured nothing), intrinsics
(fx, fy, cx, cy) in pixels of the colour image. Times are `time.monotonic()` seconds.

Needs the `real` extra: pip install 'mu0[real]'. Importing this module works without it;
using a camera raises an ImportError that names the extra.
"""

from __future__ import annotations

import datetime
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REAL_EXTRA_HINT = "pip install 'mu0[real]'"

log = logging.getLogger("mu0.realsense")


def import_pyrealsense2() -> Any:
    """pyrealsense2, or an ImportError that says which extra installs it."""
    try:
        import pyrealsense2 as rs
    except ImportError as e:
        raise ImportError(
            f"RealSense cameras need pyrealsense2 (and the system library libusb-1.0): "
            f"{REAL_EXTRA_HINT} ({e})"
        ) from e
    return rs


class EndOfRecording(Exception):
    """A recording played to its end (only raised for recordings played once)."""


@dataclass(frozen=True)
class DeviceInfo:
    """What `find_realsense()` reports for one connected device."""

    serial: str
    name: str
    product_line: str
    firmware: str
    usb_type: str


@dataclass(frozen=True, repr=False)
class RealSenseFrame:
    """One aligned RGB-D frame.

    rgb: uint8[H, W, 3]; depth_m: float32[H, W] aligned to the colour image, metres, 0 where
    there is no measurement; intrinsics: float32[4] fx, fy, cx, cy of the colour image.
    ``timestamp_ms`` and ``timestamp_domain`` are the device's own; ``captured_at`` is the
    capture time on this machine's monotonic clock (converted from the device clock, see
    `RealSenseCamera`), ``received_at`` when the frame reached this process.
    """

    rgb: np.ndarray
    depth_m: np.ndarray
    intrinsics: np.ndarray
    serial: str
    frame_number: int
    timestamp_ms: float
    timestamp_domain: str
    captured_at: float
    received_at: float
    depth_scale: float

    @property
    def age_s(self) -> float:
        """Seconds since capture."""
        return time.monotonic() - self.captured_at

    @property
    def latency_s(self) -> float:
        """Capture to arrival in this process."""
        return self.received_at - self.captured_at

    def __repr__(self) -> str:
        H, W = self.depth_m.shape
        return (
            f"RealSenseFrame(serial={self.serial}, #{self.frame_number}, {W}x{H}, "
            f"latency {self.latency_s * 1e3:.1f} ms, depth_scale {self.depth_scale:g})"
        )


@dataclass(frozen=True)
class RealSenseConfig:
    """What to open. ``serial`` picks a device (None: the only one connected);
    ``recording`` plays a `.bag`/`.db3` file instead of a live device (``serial``, if
    given, must match the recorded one). ``real_time``: play a recording at its recorded
    pace (True) or as fast as frames are read, dropping none (False)."""

    serial: str | None = None
    width: int = 640
    height: int = 480
    fps: int = 30
    recording: str | None = None
    real_time: bool = True
    repeat: bool = False
    timeout_s: float = 2.0
    # Live devices: stamp frames in the host's clock (the SDK's "global time"), so capture
    # times compare with this machine's clock without an estimate.
    global_time: bool = True
    # Depth to colour: "mu0" (`align_depth_to_color`: valid depth stays valid, holes stay
    # holes) or "sdk" (rs.align, which blanks rows and columns of valid depth and fills
    # isolated holes from a neighbour: tests/test_realsense.py measures both).
    align: str = "mu0"

    def __post_init__(self) -> None:
        if self.align not in ("mu0", "sdk"):
            raise ValueError(f"align must be 'mu0' or 'sdk', got {self.align!r}")


def find_realsense() -> list[DeviceInfo]:
    """Every RealSense device connected to this machine (empty without any)."""
    rs = import_pyrealsense2()
    out = []
    for dev in rs.context().query_devices():

        def info(key: Any, dev: Any = dev) -> str:
            return dev.get_info(key) if dev.supports(key) else ""

        out.append(
            DeviceInfo(
                serial=info(rs.camera_info.serial_number),
                name=info(rs.camera_info.name),
                product_line=info(rs.camera_info.product_line),
                firmware=info(rs.camera_info.firmware_version),
                usb_type=info(rs.camera_info.usb_type_descriptor),
            )
        )
    return out


def clocks_now(tries: int = 5) -> tuple[float, float]:
    """(time.monotonic(), time.time()) read together: the wall clock between two monotonic
    reads, retried when the thread was preempted in between (the pair would disagree by
    the pause), the midpoint kept."""
    best = None
    for _ in range(tries):
        a, wall, b = time.monotonic(), time.time(), time.monotonic()
        if best is None or b - a < best[0]:
            best = (b - a, (a + b) / 2, wall)
        if b - a < 20e-6:
            break
    return best[1], best[2]


class _ClockOffset:
    """Maps a device clock to ``time.monotonic()``.

    The smallest (arrival - device time) seen so far is the best estimate of the clock
    offset with no transport delay in it; capture times derived from it err on the side of
    frames looking older, never fresher. Used for hardware clocks and for recordings, whose
    stamps belong to another time; host-clock stamps (system/global time) convert exactly.
    """

    def __init__(self) -> None:
        self.offset_s: float | None = None

    def captured_at(self, device_s: float, received_at: float) -> float:
        lag = received_at - device_s
        if self.offset_s is None or lag < self.offset_s:
            self.offset_s = lag
        return device_s + self.offset_s


class RealSenseCamera:
    """One RealSense device (or recording, or software device) with a background reader.

        with RealSenseCamera(RealSenseConfig(serial="128422270000")) as cam:
            frame = cam.read()  # the next frame, waits up to timeout_s
            newest = cam.latest(max_age_s=0.1)  # None if nothing that fresh

    ``device``: an `rs.software_device` (or `SoftwareRealSense`) to read instead of a
    physical one; its sensors are opened directly into a frame syncer, as a pipeline
    would. Attributes valid after `connect()`: ``serial``, ``name``, ``depth_scale``
    (metres per depth unit, from the device), ``intrinsics`` (`mu0_core`-free float32[4]
    fx, fy, cx, cy of the colour stream), ``distortion`` (model name, coefficients).
    """

    def __init__(self, config: RealSenseConfig | None = None, device: Any = None) -> None:
        self.config = config or RealSenseConfig()
        if device is not None and self.config.recording is not None:
            raise ValueError("give a software device or a recording, not both")
        self._device_arg = device.device if isinstance(device, SoftwareRealSense) else device
        self.serial: str = ""
        self.name: str = ""
        self.depth_scale: float = float("nan")
        self.intrinsics = np.full(4, np.nan, np.float32)
        self.image_size: tuple[int, int] = (self.config.width, self.config.height)
        self.distortion: tuple[str, tuple[float, ...]] = ("none", ())
        self.is_playback = self.config.recording is not None
        self.counts = {"frames": 0, "incomplete": 0, "timeouts": 0}
        self._rs: Any = None
        self._pipeline: Any = None
        self._sensors: list[Any] = []
        self._syncer: Any = None
        self._align: Any = None
        # Depth intrinsics (fx, fy, cx, cy), and depth -> colour, read at connect().
        self._depth_intrinsics: np.ndarray | None = None
        self._T_color_depth = np.eye(4)
        self._aligner: DepthToColor | None = None
        self._last_captured_at = -np.inf
        self._clock = _ClockOffset()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._latest: RealSenseFrame | None = None
        self._read_number = -1  # frame_number of the last frame read() returned
        self._queue: queue.Queue[RealSenseFrame | BaseException] | None = None
        self._error: BaseException | None = None
        self._ended = False
        self._paused_playback: Any = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def is_connected(self) -> bool:
        return self._thread is not None

    @property
    def ended(self) -> bool:
        """A recording played to its end (never true for a live camera)."""
        return self._ended

    def connect(self) -> RealSenseCamera:
        """Open the device, read its intrinsics and depth unit, start the reader thread."""
        if self.is_connected:
            return self
        rs = self._rs = import_pyrealsense2()
        cfg = self.config
        if self._device_arg is not None:
            device = self._device_arg
            self._open_sensors(rs, device)
        else:
            device = self._start_pipeline(rs)
        self.serial = _info(rs, device, rs.camera_info.serial_number)
        self.name = _info(rs, device, rs.camera_info.name)
        if cfg.serial is not None and self.serial != cfg.serial:
            self.disconnect()
            raise ValueError(f"expected camera serial {cfg.serial}, the source has {self.serial}")
        self.depth_scale = float(device.first_depth_sensor().get_depth_scale())
        if not (self.depth_scale > 0):
            self.disconnect()
            raise RuntimeError(f"camera {self.serial} reports depth scale {self.depth_scale}")
        self._align = rs.align(rs.stream.color)
        # Pacing: a recording read with real_time=False hands over every frame in order.
        if self.is_playback and not cfg.real_time:
            self._queue = queue.Queue(maxsize=2)
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._reader, name=f"realsense-{self.serial}", daemon=True
        )
        self._thread.start()
        if self._paused_playback is not None:
            self._paused_playback.resume()
            self._paused_playback = None
        log.info(
            "connected %s %s: %dx%d, depth scale %g m, intrinsics %s",
            self.name,
            self.serial,
            *self.image_size,
            self.depth_scale,
            np.round(self.intrinsics, 2).tolist(),
        )
        return self

    def disconnect(self) -> None:
        """Stop the reader and release the device. Safe to call twice."""
        self._stop.set()
        if self._queue is not None:  # unblock a reader waiting to hand over a frame
            try:
                while True:
                    self._queue.get_nowait()
            except queue.Empty:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None
        if self._pipeline is not None:
            try:
                self._pipeline.stop()
            except RuntimeError:  # already stopped (a recording that ended)
                pass
            self._pipeline = None
        for sensor in self._sensors:
            for step in (sensor.stop, sensor.close):
                try:
                    step()
                except RuntimeError:
                    pass
        self._sensors = []
        self._syncer = None
        with self._cond:
            self._cond.notify_all()

    def __enter__(self) -> RealSenseCamera:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.disconnect()

    def __del__(self) -> None:  # a forgotten camera must not keep the USB device busy
        try:
            self.disconnect()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # ------------------------------------------------------------------ reading

    def read(self, timeout_s: float | None = None) -> RealSenseFrame:
        """The next frame not yet returned by `read()`; waits up to ``timeout_s``.

        Raises TimeoutError, EndOfRecording (a recording played to its end) or the reader
        thread's error.
        """
        if not self.is_connected:
            raise RuntimeError("camera is not connected: call connect() first")
        timeout_s = self.config.timeout_s if timeout_s is None else timeout_s
        if self._queue is not None:
            try:
                item = self._queue.get(timeout=timeout_s)
            except queue.Empty:
                raise TimeoutError(
                    f"no frame from {self.serial} within {timeout_s:.3g} s"
                ) from None
            if isinstance(item, BaseException):
                self._queue.put(item)  # keep reporting the end to later calls
                raise item
            return item
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                frame = self._latest
                if frame is not None and frame.frame_number != self._read_number:
                    self._read_number = frame.frame_number
                    return frame
                if self._error is not None:
                    raise self._error
                if self._ended:
                    raise EndOfRecording(self.config.recording)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no frame from {self.serial} within {timeout_s:.3g} s")
                self._cond.wait(remaining)

    def latest(self, max_age_s: float | None = None) -> RealSenseFrame | None:
        """The newest frame, or None if there is none younger than ``max_age_s``."""
        with self._cond:
            frame = self._latest
        if frame is None or (max_age_s is not None and frame.age_s > max_age_s):
            return None
        return frame

    # ------------------------------------------------------------------ internals

    def _start_pipeline(self, rs: Any) -> Any:
        cfg = self.config
        rs_config = rs.config()
        if cfg.recording is not None:
            path = Path(cfg.recording)
            if not path.is_file():
                raise FileNotFoundError(f"no RealSense recording at {path}")
            rs_config.enable_device_from_file(str(path), repeat_playback=cfg.repeat)
            # A recording holds its own resolution; take whatever depth and colour it has.
            rs_config.enable_stream(rs.stream.depth)
            rs_config.enable_stream(rs.stream.color)
        else:
            if cfg.serial is not None:
                rs_config.enable_device(cfg.serial)
            elif len(rs.context().query_devices()) == 0:
                raise RuntimeError(
                    "no RealSense camera connected (check the USB 3 cable; "
                    "`mu0.envs.realsense.find_realsense()` lists devices)"
                )
            rs_config.enable_stream(rs.stream.depth, cfg.width, cfg.height, rs.format.z16, cfg.fps)
            rs_config.enable_stream(rs.stream.color, cfg.width, cfg.height, rs.format.rgb8, cfg.fps)
        pipeline = rs.pipeline()
        try:
            profile = pipeline.start(rs_config)
        except RuntimeError as e:
            where = cfg.recording or f"serial {cfg.serial or '(any)'}"
            raise RuntimeError(
                f"could not start RealSense {where} at {cfg.width}x{cfg.height}@{cfg.fps}: {e}"
            ) from e
        self._pipeline = pipeline
        device = profile.get_device()
        if cfg.recording is not None:
            # Hold playback until the reader runs, or the first frames play to nobody.
            playback = device.as_playback()
            playback.pause()
            playback.set_real_time(cfg.real_time)
            while pipeline.poll_for_frames():  # frames that slipped out before the pause
                pass
            playback.seek(datetime.timedelta(0))
            self._paused_playback = playback
        elif cfg.global_time:
            for sensor in device.query_sensors():
                if sensor.supports(rs.option.global_time_enabled):
                    sensor.set_option(rs.option.global_time_enabled, 1)
        color = profile.get_stream(rs.stream.color).as_video_stream_profile()
        self._set_intrinsics(rs, color)
        self._set_depth_geometry(profile.get_stream(rs.stream.depth), color)
        return device

    def _open_sensors(self, rs: Any, device: Any) -> None:
        """Open a (software) device's depth and colour sensors into a frame syncer."""
        cfg = self.config
        self._syncer = rs.syncer(4)
        color_profile = depth_profile = None
        for sensor in device.query_sensors():
            profiles = [
                p
                for p in sensor.get_stream_profiles()
                if p.stream_type() in (rs.stream.depth, rs.stream.color)
            ]
            if not profiles:
                continue
            wanted = [
                p
                for p in profiles
                if p.is_video_stream_profile()
                and (p.as_video_stream_profile().width(), p.as_video_stream_profile().height())
                == (cfg.width, cfg.height)
            ]
            p = (wanted or profiles)[0]
            sensor.open(p)
            sensor.start(self._syncer)
            self._sensors.append(sensor)
            if p.stream_type() == rs.stream.color:
                color_profile = p.as_video_stream_profile()
            else:
                depth_profile = p.as_video_stream_profile()
        if color_profile is None or depth_profile is None:
            raise RuntimeError("the device needs a depth and a colour stream")
        self._set_intrinsics(rs, color_profile)
        self._set_depth_geometry(depth_profile, color_profile)

    def _set_depth_geometry(self, depth_profile: Any, color_profile: Any) -> None:
        intr = depth_profile.as_video_stream_profile().get_intrinsics()
        self._depth_intrinsics = np.array([intr.fx, intr.fy, intr.ppx, intr.ppy])
        self._aligner = None
        ext = depth_profile.get_extrinsics_to(color_profile)
        self._T_color_depth = np.eye(4)
        self._T_color_depth[:3, :3] = np.asarray(ext.rotation).reshape(3, 3).T  # column-major
        self._T_color_depth[:3, 3] = ext.translation
        if self.config.align == "mu0":  # built (and compiled) now, not in the first frame
            self._build_aligner((intr.height, intr.width))

    def _build_aligner(self, depth_hw: tuple[int, int]) -> None:
        W, H = self.image_size
        self._aligner = DepthToColor(
            self._depth_intrinsics, depth_hw, self.intrinsics, (H, W), self._T_color_depth
        )

    def _set_intrinsics(self, rs: Any, color_profile: Any) -> None:
        intr = color_profile.get_intrinsics()
        self.intrinsics = np.array([intr.fx, intr.fy, intr.ppx, intr.ppy], np.float32)
        self.image_size = (int(intr.width), int(intr.height))
        coeffs = tuple(float(c) for c in intr.coeffs)
        model = str(intr.model).split(".")[-1]
        self.distortion = (model, coeffs)
        if any(abs(c) > 1e-6 for c in coeffs):
            # Everything downstream is pinhole; RealSense colour streams are close to it.
            log.warning(
                "camera colour stream has distortion %s %s; it is ignored (pinhole model)",
                model,
                coeffs,
            )

    def _wait(self) -> tuple[bool, Any]:
        # Short slices, so disconnect() never waits out a whole timeout.
        wait_ms = int(min(self.config.timeout_s, 0.1) * 1000)
        if self._pipeline is not None:
            return self._pipeline.try_wait_for_frames(wait_ms)
        return self._syncer.try_wait_for_frames(wait_ms)

    def _reader(self) -> None:
        rs = self._rs
        waiting_since = time.monotonic()
        try:
            while not self._stop.is_set():
                ok, frames = self._wait()
                # Both clocks at once, before any processing: a host-clock stamp converts to
                # the monotonic clock by their difference at this instant.
                received_at, received_wall = clocks_now()
                if not ok:
                    if self.is_playback and self._playback_stopped():
                        self._finish()
                        return
                    if received_at - waiting_since > self.config.timeout_s:
                        self.counts["timeouts"] += 1
                        log.warning(
                            "camera %s: no frame for %.1f s",
                            self.serial,
                            received_at - waiting_since,
                        )
                        waiting_since = received_at
                    continue
                waiting_since = received_at
                frame = self._convert(rs, frames, received_at, received_wall)
                if frame is None:
                    self.counts["incomplete"] += 1
                    continue
                if self._latest is not None and frame.frame_number == self._latest.frame_number:
                    continue  # the same colour frame again (a syncer or a playback seek)
                self.counts["frames"] += 1
                self._publish(frame)
        except BaseException as e:  # noqa: BLE001 - handed to the reading thread
            log.exception("camera %s reader failed", self.serial)
            with self._cond:
                self._error = e
                self._cond.notify_all()
            if self._queue is not None:
                self._put(e)

    def _playback_stopped(self) -> bool:
        if self._pipeline is None:
            return False
        rs = self._rs
        try:
            status = self._pipeline.get_active_profile().get_device().as_playback()
            return status.current_status() == rs.playback_status.stopped
        except RuntimeError:
            return True

    def _finish(self) -> None:
        with self._cond:
            self._ended = True
            self._cond.notify_all()
        if self._queue is not None:
            self._put(EndOfRecording(self.config.recording))

    def _put(self, item: Any) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _publish(self, frame: RealSenseFrame) -> None:
        with self._cond:
            self._latest = frame
            self._cond.notify_all()
        if self._queue is not None:
            self._put(frame)

    def _aligned_depth_m(self, frames: Any) -> np.ndarray | None:
        """float32[H, W] metres in the colour image, 0 where nothing was measured."""
        if self.config.align == "sdk":
            depth = self._align.process(frames).get_depth_frame()
            if not depth:
                return None
            return np.asanyarray(depth.get_data()).astype(np.float32) * np.float32(self.depth_scale)
        raw = np.asanyarray(frames.get_depth_frame().get_data())  # uint16 device units
        if self._aligner is None or self._aligner.depth_hw != raw.shape:
            self._build_aligner(raw.shape)
        return self._aligner(raw, self.depth_scale)

    def _convert(
        self, rs: Any, frames: Any, received_at: float, received_wall: float
    ) -> RealSenseFrame | None:
        if not frames.first_or_default(rs.stream.depth) or not frames.first_or_default(
            rs.stream.color
        ):
            return None  # a syncer hands over a lone frame while its partner is late
        color = frames.get_color_frame()
        depth_m = self._aligned_depth_m(frames)
        if depth_m is None or not color:
            return None
        rgb = np.array(np.asanyarray(color.get_data()), dtype=np.uint8, copy=True)
        color_format = color.get_profile().format()
        if color_format == rs.format.bgr8:  # realsense-viewer may record BGR
            rgb = np.ascontiguousarray(rgb[..., ::-1])
        elif color_format != rs.format.rgb8:
            raise RuntimeError(f"colour stream is {color_format}; record or stream RGB8 or BGR8")
        timestamp_ms = float(color.get_timestamp())
        domain = str(color.get_frame_timestamp_domain()).split(".")[-1]
        if not self.is_playback and domain in ("system_time", "global_time"):
            # Host-clock stamps: milliseconds since the epoch on this machine.
            captured_at = received_at - (received_wall - timestamp_ms / 1e3)
        else:
            captured_at = self._clock.captured_at(timestamp_ms / 1e3, received_at)
        # A step of the wall clock (NTP) must not send capture times backwards.
        captured_at = max(min(captured_at, received_at), self._last_captured_at + 1e-6)
        self._last_captured_at = captured_at
        return RealSenseFrame(
            rgb=rgb,
            depth_m=depth_m,
            intrinsics=self.intrinsics.copy(),
            serial=self.serial,
            frame_number=int(color.get_frame_number()),
            timestamp_ms=timestamp_ms,
            timestamp_domain=domain,
            captured_at=captured_at,
            received_at=received_at,
            depth_scale=self.depth_scale,
        )


class DepthToColor:
    """Depth as the colour camera sees it, for one pair of streams (geometry fixed).

    depth_intrinsics, color_intrinsics: (fx, fy, cx, cy) of each image (pinhole);
    T_color_depth: float64[4, 4] depth -> colour; sizes as (height, width). Calling it
    with float32[Hd, Wd] depth in metres (or the device's uint16 units and their
    ``depth_scale``, metres per unit; 0 = none) returns float32[Hc, Wc], z in metres in
    the colour camera, 0 = no depth.

    Each colour pixel takes the depth of the surface point its ray meets, measured by the
    depth pixel nearest to that point; where that depth pixel has no measurement it stays
    0. It is computed forwards, in one compiled pass over the depth image
    (`envs.depth_splat`): every measured pixel's cell (the square of the depth image
    nearer to it than to any other pixel) is carried into the colour image on the plane
    through the pixel and its neighbours on the same surface (1/z is linear across the
    image of a plane, so planes come out exact), and the colour pixels inside it take
    that plane's depth, the nearest surface winning where cells overlap (occlusion).
    Cells tile the surface, so valid depth stays valid at any resolution ratio, and a
    hole's cell is left empty, so holes stay holes; colour pixels that see what the depth
    camera could not (behind an edge) get 0.
    """

    def __init__(self, depth_intrinsics, depth_hw, color_intrinsics, color_hw, T_color_depth):
        try:
            from envs import depth_splat
        except ImportError as e:
            raise ImportError(
                f"align='mu0' needs numba: {REAL_EXTRA_HINT}, or RealSenseConfig(align='sdk') ({e})"
            ) from e
        self._splat = depth_splat.splat_depth
        self.Kd = np.asarray(depth_intrinsics, dtype=np.float64)
        self.Kc = np.asarray(color_intrinsics, dtype=np.float64)
        self.depth_hw = (int(depth_hw[0]), int(depth_hw[1]))
        self.color_hw = (int(color_hw[0]), int(color_hw[1]))
        T = np.asarray(T_color_depth, dtype=np.float64)
        self.R, self.t = T[:3, :3], T[:3, 3].copy()
        Hd, Wd = self.depth_hw
        fxd, fyd, cxd, cyd = self.Kd
        # Depth pixel rays turned into the colour frame, and their change per pixel.
        xs, ys = np.meshgrid((np.arange(Wd) - cxd) / fxd, (np.arange(Hd) - cyd) / fyd)
        rays = np.stack([xs, ys, np.ones_like(xs)])  # [3, Hd, Wd]
        self.rays_c = np.ascontiguousarray(np.einsum("ij,jhw->ihw", self.R, rays), np.float32)
        self.du_c = self.R[:, 0] / fxd
        self.dv_c = self.R[:, 1] / fyd
        # A cell is about (colour f / depth f) pixels wide; one over 4x that is a surface
        # seen edge-on, filled only that far round its centre.
        scale = max(self.Kc[0] / fxd, self.Kc[1] / fyd, 1.0)
        self.max_span = float(np.ceil(4 * scale) + 1)
        depth_splat.warm_up()  # compile now, not in the first frame

    def __call__(self, depth: np.ndarray, depth_scale: float = 1.0) -> np.ndarray:
        depth = np.asarray(depth)
        # The device's units go in as they are: converting to metres first costs a pass.
        dtype = np.uint16 if depth.dtype == np.uint16 else np.float32
        depth = np.ascontiguousarray(depth, dtype=dtype)
        if depth.shape != self.depth_hw:
            raise ValueError(f"depth is {depth.shape}, this aligner is for {self.depth_hw}")
        out = np.zeros(self.color_hw, np.float32)
        self._splat(
            depth,
            float(depth_scale),
            self.rays_c,
            self.du_c,
            self.dv_c,
            self.t,
            self.Kc,
            self.max_span,
            out,
        )
        return out


def align_depth_to_color(
    depth_m: np.ndarray,
    depth_intrinsics: np.ndarray,
    color_intrinsics: np.ndarray,
    T_color_depth: np.ndarray,
    color_hw: tuple[int, int],
) -> np.ndarray:
    """One frame through `DepthToColor` (build one and reuse it for a stream)."""
    aligner = DepthToColor(
        depth_intrinsics, np.shape(depth_m), color_intrinsics, color_hw, T_color_depth
    )
    return aligner(depth_m)


def _info(rs: Any, device: Any, key: Any) -> str:
    return device.get_info(key) if device.supports(key) else ""


class CameraGroup:
    """Several cameras read together: `read()` returns one frame per serial.

    Each camera keeps its own reader thread (as the SDK expects one pipeline per device).
    """

    def __init__(self, cameras: Iterable[RealSenseCamera]) -> None:
        self.cameras = list(cameras)

    def connect(self) -> CameraGroup:
        try:
            for cam in self.cameras:
                cam.connect()
        except BaseException:
            self.disconnect()
            raise
        serials = [c.serial for c in self.cameras]
        if len(set(serials)) != len(serials):
            self.disconnect()
            raise ValueError(f"the same camera was opened twice: {serials}")
        return self

    def disconnect(self) -> None:
        for cam in self.cameras:
            cam.disconnect()

    def read(self, timeout_s: float | None = None) -> dict[str, RealSenseFrame]:
        return {cam.serial: cam.read(timeout_s) for cam in self.cameras}

    def __enter__(self) -> CameraGroup:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.disconnect()


# --------------------------------------------------------------------------- software device

# Depth units of the models the project is deployed with (metres per z16 count).
DEPTH_UNITS = {"D405": 1e-4, "D435": 1e-3, "D435i": 1e-3, "D415": 1e-3, "D455": 1e-3}


@dataclass
class SoftwareRealSense:
    """An `rs.software_device` that looks like a RealSense model: a depth and a colour
    sensor with the given intrinsics, the model's depth unit, a serial number.

    Depth and colour share one viewpoint unless ``depth_to_color_m`` shifts them (then
    the SDK's alignment has work to do). `push()` feeds one frame pair; stamps are in the
    host clock ("system time"), as a live device with global time enabled gives them.
    """

    serial: str = "000000000001"
    model: str = "D435"
    width: int = 64
    height: int = 48
    fps: int = 30
    intrinsics: tuple[float, float, float, float] | None = None  # fx, fy, cx, cy
    depth_units: float | None = None
    depth_to_color_m: tuple[float, float, float] = (0.0, 0.0, 0.0)
    # The colour stream's own size and intrinsics (default: the depth stream's).
    color_size: tuple[int, int] | None = None  # (width, height)
    color_intrinsics: tuple[float, float, float, float] | None = None
    device: Any = field(init=False, repr=False)

    def __post_init__(self) -> None:
        rs = import_pyrealsense2()
        if self.depth_units is None:
            self.depth_units = DEPTH_UNITS.get(self.model, 1e-3)
        if self.intrinsics is None:
            f = 0.9 * self.width
            self.intrinsics = (f, f, (self.width - 1) / 2, (self.height - 1) / 2)
        if self.color_size is None:
            self.color_size = (self.width, self.height)
        if self.color_intrinsics is None:
            sx, sy = self.color_size[0] / self.width, self.color_size[1] / self.height
            fx, fy, cx, cy = self.intrinsics
            self.color_intrinsics = (fx * sx, fy * sy, (cx + 0.5) * sx - 0.5, (cy + 0.5) * sy - 0.5)
        self._rs = rs
        dev = self.device = rs.software_device()
        dev.register_info(rs.camera_info.serial_number, self.serial)
        dev.register_info(rs.camera_info.name, f"Intel RealSense {self.model} (software)")
        self._depth_sensor = dev.add_sensor("Stereo Module")
        self._color_sensor = dev.add_sensor("RGB Camera")
        self._depth_profile = self._add_stream(
            self._depth_sensor, rs.stream.depth, 0, (self.width, self.height), self.intrinsics
        )
        self._color_profile = self._add_stream(
            self._color_sensor, rs.stream.color, 1, self.color_size, self.color_intrinsics
        )
        self._depth_sensor.add_read_only_option(rs.option.depth_units, float(self.depth_units))
        extrinsics = rs.extrinsics()
        extrinsics.rotation = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
        extrinsics.translation = [float(x) for x in self.depth_to_color_m]
        self._depth_profile.register_extrinsics_to(self._color_profile, extrinsics)
        dev.create_matcher(rs.matchers.default)
        self._frame_number = 0
        self._keep: deque[np.ndarray] = deque(maxlen=16)  # buffers the SDK may still read

    def _add_stream(self, sensor: Any, stream: Any, uid: int, size: Any, K: Any) -> Any:
        rs = self._rs
        intr = rs.intrinsics()
        intr.width, intr.height = size
        intr.fx, intr.fy, intr.ppx, intr.ppy = (float(x) for x in K)
        intr.model = rs.distortion.none
        intr.coeffs = [0.0] * 5
        vs = rs.video_stream()
        vs.type, vs.index, vs.uid = stream, 0, uid
        vs.width, vs.height, vs.fps, vs.intrinsics = size[0], size[1], self.fps, intr
        if stream == rs.stream.depth:
            vs.bpp, vs.fmt = 2, rs.format.z16
        else:
            vs.bpp, vs.fmt = 3, rs.format.rgb8
        return sensor.add_video_stream(vs)

    def depth_to_z16(self, depth_m: np.ndarray) -> np.ndarray:
        """float metres -> uint16 counts in this device's unit (0 = no depth)."""
        counts = np.round(np.nan_to_num(np.asarray(depth_m, np.float64)) / self.depth_units)
        return np.clip(counts, 0, 65535).astype(np.uint16)

    def push(self, rgb: np.ndarray, depth_m: np.ndarray, timestamp_ms: float | None = None) -> int:
        """Feed one colour + depth pair (same stamp and frame number); returns the number."""
        rs = self._rs
        H, W = self.height, self.width
        Wc, Hc = self.color_size
        if rgb.shape != (Hc, Wc, 3) or depth_m.shape != (H, W):
            raise ValueError(
                f"expected rgb {(Hc, Wc, 3)} and depth {(H, W)}, got {rgb.shape}, {depth_m.shape}"
            )
        stamp = time.time() * 1e3 if timestamp_ms is None else float(timestamp_ms)
        number = self._frame_number
        self._frame_number += 1
        z16 = np.ascontiguousarray(self.depth_to_z16(depth_m))
        color = np.ascontiguousarray(rgb, dtype=np.uint8)
        self._keep.extend([z16, color])
        for sensor, profile, pixels, bpp in (
            (self._depth_sensor, self._depth_profile, z16, 2),
            (self._color_sensor, self._color_profile, color, 3),
        ):
            f = rs.software_video_frame()
            f.pixels = pixels
            f.bpp, f.stride = bpp, bpp * pixels.shape[1]
            f.timestamp = stamp
            f.domain = rs.timestamp_domain.system_time
            f.frame_number = number
            f.profile = profile.as_video_stream_profile()
            if bpp == 2:
                f.depth_units = float(self.depth_units)
            sensor.on_video_frame(f)
        return number


def write_recording(
    path: str | Path,
    frames: Iterable[tuple[np.ndarray, np.ndarray]],
    *,
    width: int,
    height: int,
    intrinsics: tuple[float, float, float, float],
    fps: int = 30,
    model: str = "D435",
    serial: str = "000000000001",
) -> int:
    """Record (rgb uint8[H, W, 3], depth_m float32[H, W]) pairs as a RealSense file that
    `RealSenseConfig(recording=path)` plays back like the camera (the SDK's recorder;
    `.db3` in pyrealsense2 2.59). Frames are written at ``fps`` in real time (the recorder
    keeps the pace they arrive at), so this takes as long as the recording lasts. Returns
    the frame count."""
    rs = import_pyrealsense2()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    sw = SoftwareRealSense(
        serial=serial, model=model, width=width, height=height, fps=fps, intrinsics=intrinsics
    )
    recorder = rs.recorder(str(path), sw.device)
    sensors = (sw._depth_sensor, sw._color_sensor)
    profiles = (sw._depth_profile, sw._color_profile)
    for sensor, profile in zip(sensors, profiles):
        sensor.open(profile)
        sensor.start(lambda f: None)
    # The recorder stamps frames with their arrival, and playback keeps that pace: push
    # them at the frame rate, or a recording plays back in a blink.
    t0 = time.monotonic()
    stamp0 = time.time() * 1e3
    n = 0
    try:
        for rgb, depth_m in frames:
            time.sleep(max(0.0, t0 + n / fps - time.monotonic()))
            sw.push(rgb, depth_m, timestamp_ms=stamp0 + n * 1e3 / fps)
            n += 1
    finally:
        for sensor in sensors:
            sensor.stop()
            sensor.close()
        del recorder  # the file is complete once the recorder is released
    return n
