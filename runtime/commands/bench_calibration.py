"""`mu0 bench calibration`: ChArUco hand-eye calibration in simulation against the truth.

A ChArUco board rides on the simulated gripper; the task's fixed camera renders it at
``--poses`` varied, board-visible arm poses; the robot poses are the simulator's grip-site
poses in the base frame. The recovered ``T_base_cam`` is compared with the simulator's
(the environment's observation). With ``--eye-in-hand`` the wrist camera is calibrated
the same way against a board on the table. ``--pose-noise-mm/--pose-noise-deg`` perturb
the robot poses handed to the solver, to see how a real arm's kinematic error propagates.

``--sweep`` instead runs the solver's refusal and outlier cases over seeds on pose sets
with a known answer (`calibration.synthetic`: projected corners with pixel noise, PnP,
robot poses exact except the views made wrong on purpose), without rendering: rotations
about one axis, two wrong robot poses among 6 and among 20, a clean set with 1 px noise.
Each run passes or fails that case's rule (`SCENARIOS`); docs/calibration.md has the table.
"""

from __future__ import annotations

import argparse
import re
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
    p.add_argument(
        "--bad",
        action="append",
        default=[],
        metavar="VIEW:METRES:DEGREES",
        help="make a view's robot pose wrong by this much (repeatable), e.g. 3:0.02:0 11:0:5",
    )
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    p.add_argument(
        "--sweep", action="store_true", help="the refusal/outlier cases over seeds (no render)"
    )
    p.add_argument("--seeds", type=int, default=10, help="--sweep: seeds per case")
    p.add_argument("--cases", default=None, help="--sweep: comma-separated case names")
    p.set_defaults(func=run)


# The sweep's cases: the pose set (`make_pose_set` arguments) and what must happen.
# "bad" maps a view to how far its robot pose is off: (metres, degrees).
SCENARIOS: dict[str, dict] = {
    "one_axis": {"n": 20, "rotations": "one_axis", "rule": "refused"},
    "near_one_axis_3deg_1px": {
        "n": 20,
        "rotations": "near_one_axis",
        "off_axis_deg": 3.0,
        "pixel_noise": 1.0,
        "rule": "not good",
    },
    # Refused, or accepted with both wrong views dropped and the answer within tolerance.
    "6_poses_2_bad": {"n": 6, "bad": {1: (0.02, 0.0), 4: (0.0, 5.0)}, "rule": "bad caught"},
    "20_poses_2_bad": {"n": 20, "bad": {3: (0.02, 0.0), 11: (0.0, 5.0)}, "rule": "bad dropped"},
    "20_poses_2_bad_5deg": {
        "n": 20,
        "bad": {3: (0.0, 5.0), 11: (0.0, 5.0)},
        "rule": "bad dropped",
    },
    "20_poses_clean_1px": {"n": 20, "pixel_noise": 1.0, "rule": "good"},
}
TOLERANCE = (5.0, 0.5)  # mm, degrees: the acceptance figure


def run_case(name: str, kind: str, seed: int) -> dict:
    """One sweep run: the figures and whether the case's rule held."""
    from calibration.board import CharucoBoardSpec
    from calibration.handeye import CalibrationError, calibrate_hand_eye
    from calibration.synthetic import K_640, make_pose_set
    from calibration.transforms import pose_error

    case = dict(SCENARIOS[name])
    rule = case.pop("rule")
    n = case.pop("n")
    s = make_pose_set(kind, n, seed, **case)
    bad = sorted(s.bad)
    out = {"case": name, "kind": kind, "seed": seed, "bad": bad}
    try:
        r = calibrate_hand_eye(kind, s.T_base_eef, s.views, CharucoBoardSpec(), K_640)
    except CalibrationError as e:
        msg = str(e)
        head = msg.split(":")[0]
        named = re.match(r"views? ([\d, ]+) disagrees? with the others", head)
        named = [int(v) for v in named.group(1).split(", ")] if named else []
        ok = rule in ("refused", "not good", "bad caught")
        return out | {"verdict": "refused", "message": msg, "named": named, "ok": ok}
    trans_mm, rot_deg = pose_error(r.T_ref_cam, s.truth)
    dropped = sorted(i for i, why in r.views_rejected.items() if i < n)
    within = trans_mm <= TOLERANCE[0] and rot_deg <= TOLERANCE[1]
    verdict = getattr(r, "verdict", "accepted")
    bad_dropped = bool(bad) and set(bad) <= set(dropped)
    ok = {
        "refused": False,
        "not good": verdict == "marginal",
        "bad caught": bad_dropped and within,
        "bad dropped": bad_dropped and within and len(dropped) <= len(bad) + 1,
        "good": within and not dropped and verdict == "good",
    }[rule]
    return out | {
        "verdict": verdict,
        "trans_err_mm": round(trans_mm, 3),
        "rot_err_deg": round(rot_deg, 4),
        "dropped": dropped,
        "chain_rms_px": round(r.reprojection_rms_px, 3),
        "warnings": list(getattr(r, "warnings", [])),
        "ok": ok,
    }


def run_sweep(args: argparse.Namespace) -> int:
    from runtime.commands.bench import write_json

    names = args.cases.split(",") if args.cases else list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise SystemExit(f"unknown --cases {unknown}; choose from {list(SCENARIOS)}")
    t0 = time.perf_counter()
    runs, summary = [], []
    print(f"{'case':26s} {'kind':12s} ok/seeds  max error        dropped views (bad: *)")
    for name in names:
        for kind in ("eye_to_hand", "eye_in_hand"):
            rows = [run_case(name, kind, seed) for seed in range(args.seeds)]
            runs += rows
            errs = [(r["trans_err_mm"], r["rot_err_deg"]) for r in rows if "trans_err_mm" in r]
            worst = (
                f"{max(e[0] for e in errs):7.2f} mm {max(e[1] for e in errs):6.3f}°"
                if errs
                else f"{'—':>18s}"
            )
            drops = " ".join(
                "refused"
                + (
                    "(" + ",".join(f"{i}{'*' if i in r['bad'] else ''}" for i in r["named"]) + ")"
                    if r["named"]
                    else ""
                )
                if r["verdict"] == "refused"
                else "["
                + ",".join(f"{i}{'*' if i in r['bad'] else ''}" for i in r["dropped"])
                + "]"
                for r in rows
            )
            ok = sum(r["ok"] for r in rows)
            summary.append(
                {
                    "case": name,
                    "kind": kind,
                    "ok": ok,
                    "seeds": len(rows),
                    "refused": sum(r["verdict"] == "refused" for r in rows),
                    "max_trans_err_mm": max((e[0] for e in errs), default=None),
                    "max_rot_err_deg": max((e[1] for e in errs), default=None),
                }
            )
            print(f"{name:26s} {kind:12s} {ok:2d}/{len(rows):<2d}    {worst}  {drops}")
    seconds = round(time.perf_counter() - t0, 1)
    print(f"{len(runs)} runs in {seconds} s")
    write_json(args.json, {"summary": summary, "runs": runs, "seconds": seconds})
    return 0 if all(s["ok"] == s["seeds"] for s in summary) else 1


def _print(figures: dict) -> None:
    print(
        f"{figures['kind']:12s} {figures['camera']:20s} views {figures['views_used']}/"
        f"{figures['views_captured']} used  T error {figures['trans_err_mm']:.3f} mm "
        f"{figures['rot_err_deg']:.4f} deg  reprojection {figures['reprojection_rms_px']:.3f} px "
        f"({figures['method']}), verdict {figures.get('verdict', '(none)')}"
    )
    for warning in figures.get("warnings", []):
        print(f"{'':12s} {warning}")
    for view, reason in figures["views_rejected"].items():
        print(f"{'':12s} view {view} rejected: {reason}")


def run(args: argparse.Namespace) -> int:
    from envs.charuco_sim import CharucoSimScene, simulate_calibration
    from runtime.commands.bench import write_json

    if args.sweep:
        return run_sweep(args)
    if args.poses < 15:
        print(f"note: {args.poses} poses; the acceptance figure is for 15 or more")
    try:
        bad = {int(v): (float(m), float(d)) for v, m, d in (b.split(":") for b in args.bad)}
    except ValueError:
        raise SystemExit(
            f"--bad takes VIEW:METRES:DEGREES, e.g. 3:0.02:0; got {args.bad}"
        ) from None
    from calibration.handeye import CalibrationError

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
            try:
                figures = simulate_calibration(
                    scene,
                    kind,
                    num_poses=args.poses,
                    seed=args.seed,
                    pose_noise_mm=args.pose_noise_mm,
                    pose_noise_deg=args.pose_noise_deg,
                    bad=bad,
                )
            except CalibrationError as e:
                print(f"{kind:12s} refused: {e}")
                return 1
            figures.pop("result")
            figures["bad_views"] = {str(k): list(v) for k, v in bad.items()}
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
