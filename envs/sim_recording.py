"""Record a simulated episode as a RealSense stream, with its calibration file.

The task's scripted demonstrator runs in robosuite; each control step's RGB-D frame from
the fixed camera goes through a software RealSense device into the SDK's recorder, so the
result plays back like a real camera (`RealSenseConfig(recording=...)`). The camera's true
pose becomes an eye-to-hand calibration file for the recording's serial, and the robot's
proprioception is saved alongside. It is what `mu0 run-real --dry-run` can replay on a
machine without a camera:

    python -m envs.sim_recording --out recordings/lift_panda --task Lift --robot Panda
    mu0 run-real --config configs/real/sim_dry_run.yaml --dry-run
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

import numpy as np

SIM_SERIAL = "SIM00000001"


def record_episode(
    out: str | Path,
    task: str = "Lift",
    robot: str = "Panda",
    frames: int = 90,
    image_size: tuple[int, int] = (480, 640),
    seed: int = 0,
    fps: int = 20,
) -> dict:
    """Write ``out/stream.db3``, ``out/calibration/<file>.json`` and ``out/episode.json``."""
    from calibration.files import CameraCalibration
    from envs.demos import make_demonstrator
    from envs.realsense import write_recording
    from envs.robosuite_env import RobosuiteTraceEnv

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    env = RobosuiteTraceEnv(task, robot, image_size=image_size)
    demo = make_demonstrator(task)
    obs, _ = env.reset(seed=seed)
    demo.reset()
    pictures, proprio = [], []
    for _ in range(frames):
        pictures.append((obs["rgb"], obs["depth_m"]))
        proprio.append(obs["proprio"].tolist())
        obs, *_ = env.step(demo(env))
    intrinsics = tuple(float(x) for x in obs["intrinsics"])
    T_base_cam = obs["T_base_cam"].astype(np.float64)
    env.close()
    H, W = image_size
    n = write_recording(
        out / "stream.db3",
        pictures,
        width=W,
        height=H,
        intrinsics=intrinsics,
        fps=fps,
        model="D435",
        serial=SIM_SERIAL,
    )
    calib = CameraCalibration(
        kind="eye_to_hand",
        camera_serial=SIM_SERIAL,
        camera_name="Intel RealSense D435 (software)",
        intrinsics=intrinsics,
        image_size=(W, H),
        T_ref_cam=T_base_cam,
        created_at=dt.datetime.now(dt.timezone.utc),
        depth_scale=1e-3,
        robot=robot,
        notes=f"simulator truth for {task}-{robot} seed {seed} (envs.sim_recording)",
    )
    calib_path = calib.save(out / "calibration")
    meta = {
        "task": task,
        "robot": robot,
        "seed": seed,
        "frames": n,
        "fps": fps,
        "serial": SIM_SERIAL,
        "start_eef_pos_base": proprio[0][:3],
        "start_eef_quat_base_xyzw": proprio[0][3:7],
        "proprio": proprio,
    }
    (out / "episode.json").write_text(json.dumps(meta) + "\n")
    return {"stream": str(out / "stream.db3"), "calibration": str(calib_path), "frames": n}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--task", default="Lift")
    p.add_argument("--robot", default="Panda")
    p.add_argument("--frames", type=int, default=90)
    p.add_argument("--image-size", type=int, nargs=2, default=(480, 640), metavar=("H", "W"))
    p.add_argument("--fps", type=int, default=20, help="recorded frame rate")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    result = record_episode(
        args.out, args.task, args.robot, args.frames, tuple(args.image_size), args.seed, args.fps
    )
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
