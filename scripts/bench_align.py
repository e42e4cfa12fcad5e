"""Time depth-to-colour alignment per frame: ours (`DepthToColor`) against the SDK's
rs.align, on the same frames through an `rs.software_device` (D435-like: 640x480 depth,
f = 385 px; 640x480 colour, f = 615 px; 15 mm apart; a 30° plane with 5 % holes).

    PYTHONPATH=. python scripts/bench_align.py [--frames 30] [--repeats 3]

Each repeat streams through both, one after the other, so a busy machine slows both
alike; wall time and the reader thread's CPU time are both printed (on a shared machine
the CPU time varies less), per repeat and pooled, with ours / rs.align.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from envs.realsense import RealSenseCamera, RealSenseConfig, SoftwareRealSense


class _TimedCamera(RealSenseCamera):
    def __init__(self, *a, **k) -> None:
        super().__init__(*a, **k)
        self.align_ms: list[float] = []
        self.cpu_ms: list[float] = []

    def _aligned_depth_m(self, frames):
        t, cpu = time.perf_counter(), time.thread_time()
        out = super()._aligned_depth_m(frames)
        self.align_ms.append((time.perf_counter() - t) * 1e3)
        self.cpu_ms.append((time.thread_time() - cpu) * 1e3)
        return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    W, H = 640, 480
    Kd, Kc = (385.0, 385.0, 319.7, 239.3), (615.0, 615.0, 320.3, 240.1)
    xs, ys = np.meshgrid((np.arange(W) - Kd[2]) / Kd[0], (np.arange(H) - Kd[3]) / Kd[1])
    n = np.array([np.sin(np.deg2rad(30)), 0.0, np.cos(np.deg2rad(30))])
    depth = (0.5 * n[2] / (n[0] * xs + n[1] * ys + n[2])).astype(np.float32)
    depth[np.random.default_rng(0).random(depth.shape) < 0.05] = 0.0
    rgb = np.zeros((H, W, 3), np.uint8)
    pooled: dict[str, dict[str, list[float]]] = {a: {"wall": [], "cpu": []} for a in ("sdk", "mu0")}
    for align in ("sdk", "mu0") * args.repeats:  # interleaved: a busy machine hits both
        sw = SoftwareRealSense(
            serial="BENCH",
            width=W,
            height=H,
            intrinsics=Kd,
            color_intrinsics=Kc,
            depth_to_color_m=(0.015, 0.0, 0.0),
        )
        with _TimedCamera(RealSenseConfig(width=W, height=H, align=align), device=sw) as cam:
            for _ in range(args.frames):
                sw.push(rgb, depth)
                time.sleep(1.0 / sw.fps)
            time.sleep(0.5)
        ms, cpu = cam.align_ms[1:], cam.cpu_ms[1:]  # the first frame starts the stream
        pooled[align]["wall"] += ms
        pooled[align]["cpu"] += cpu
        print(f"{align}: {len(ms)} frames, {_figures(ms, cpu)}")
    print("pooled:")
    for align, f in pooled.items():
        print(f"  {align}: {len(f['wall'])} frames, {_figures(f['wall'], f['cpu'])}")
    ratio = {k: np.median(pooled["mu0"][k]) / np.median(pooled["sdk"][k]) for k in ("wall", "cpu")}
    print(f"ours / rs.align, p50: wall {ratio['wall']:.2f}x, cpu {ratio['cpu']:.2f}x")


def _figures(wall_ms: list[float], cpu_ms: list[float]) -> str:
    return (
        f"wall p50 {np.median(wall_ms):.1f} ms, p90 {np.percentile(wall_ms, 90):.1f} ms; "
        f"cpu p50 {np.median(cpu_ms):.1f} ms"
    )


if __name__ == "__main__":
    main()
