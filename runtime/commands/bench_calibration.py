"""`mu0 bench calibration`: ChArUco hand-eye calibration in simulation against the truth.

A ChArUco board rides on the simulated gripper; the task's fixed camera renders it at
``--poses`` varied, board-visible arm poses; the robot poses are the simulator's grip-site
poses in the base frame. The recovered ``T_base_cam`` is compared with the simulator's
(the environment's observation). With ``--eye-in-hand`` the wrist camera is calibrated
the same way against a board on the table. ``--pose-noise-mm/--pose-noise-deg`` perturb
the robot poses handed to the solver, to see how a real arm's kinematic error propagates.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def add_bench_parser(what) -> None:
    p = what.add_parser(
        "calibration",
        help="ChArUco hand-eye calibration in simulation vs the simulator's T_base_cam",
    )
    p.add_argument("--robot", default="Panda")
    p.add_argument("--task", default="Lift")
    p.add_argument("--camera", default=None, help="fixed camera (default: the task's)")
    p.add_argument("--poses", type=int, default=20, help="arm poses (15 or more)")
    p.add_argument("--image-size", type=int, nargs=2, default=(480, 640), metavar=("H", "W"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eye-in-hand", action="store_true", help="also calibrate the wrist camera")
    p.add_argument("--pose-noise-mm", type=float, default=0.0)
    p.add_argument("--pose-noise-deg", type=float, default=0.0)
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    p.set_defaults(func=run)


def _print(figures: dict) -> None:
    print(
        f"{figures['kind']:12s} {figures['camera']:20s} views {figures['views_used']}/"
        f"{figures['views_captured']} used  T error {figures['trans_err_mm']:.3f} mm "
        f"{figures['rot_err_deg']:.4f} deg  reprojection {figures['reprojection_rms_px']:.3f} px "
        f"({figures['method']})"
    )
    for view, reason in figures["views_rejected"].items():
        print(f"{'':12s} view {view} rejected: {reason}")


def run(args: argparse.Namespace) -> int:
    from envs.charuco_sim import CharucoSimScene, simulate_calibration
    from runtime.commands.bench import write_json

    if args.poses < 15:
        print(f"note: {args.poses} poses; the acceptance figure is for 15 or more")
    t0 = time.perf_counter()
    with CharucoSimScene(
        robot=args.robot,
        task=args.task,
        camera=args.camera,
        image_size=tuple(args.image_size),
    ) as scene:
        build_s = time.perf_counter() - t0
        kinds = ["eye_to_hand"] + (["eye_in_hand"] if args.eye_in_hand else [])
        runs = {}
        for kind in kinds:
            t = time.perf_counter()
            figures = simulate_calibration(
                scene,
                kind,
                num_poses=args.poses,
                seed=args.seed,
                pose_noise_mm=args.pose_noise_mm,
                pose_noise_deg=args.pose_noise_deg,
            )
            figures.pop("result")
            figures["seconds"] = round(time.perf_counter() - t, 2)
            runs[kind] = figures
            _print(figures)
    main = runs["eye_to_hand"]
    out = {
        # The acceptance figures: the fixed camera's T_base_cam against the simulator's.
        "trans_err_mm": main["trans_err_mm"],
        "rot_err_deg": main["rot_err_deg"],
        "poses": args.poses,
        "image_size_hw": list(args.image_size),
        "robot": args.robot,
        "task": args.task,
        "pose_noise_mm": args.pose_noise_mm,
        "pose_noise_deg": args.pose_noise_deg,
        "scene_build_s": round(build_s, 2),
        **runs,
    }
    ok = main["trans_err_mm"] <= 5.0 and main["rot_err_deg"] <= 0.5
    print(
        f"T_base_cam error {main['trans_err_mm']:.3f} mm, {main['rot_err_deg']:.4f} deg "
        f"({'within' if ok else 'OUTSIDE'} 5 mm / 0.5 deg)"
    )
    write_json(args.json, out)
    return 0 if ok else 1
