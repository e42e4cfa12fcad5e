"""`mu0 calibrate`: guided ChArUco hand-eye calibration of a RealSense camera and an arm.

Real set-up (``--config configs/real/<setup>.yaml``): the camera's intrinsics and depth
unit come from the device; at each prompt move the arm (free-drive on the teach pendant)
so the camera sees the board, press Enter to capture; the command says how many views are
good and what the next ones should add (more tilt, more spread), ``u`` drops the last,
``s`` solves once there are enough. With ``--auto`` the arm moves itself through poses
around where it starts, through the safety layer, after a confirmation.
``--sim`` runs the same session on the simulated rig (no hardware, no prompts).
The result is written as a timestamped calibration file that `mu0 run-real` loads, and a
verdict is printed: good, marginal (written, with the reasons) or refused (nothing written,
with what to recapture or which motion to add); docs/deployment.md lists the figures.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def add_parser(sub) -> None:
    p = sub.add_parser(
        "calibrate",
        help="guided ChArUco hand-eye calibration (eye-to-hand or eye-in-hand)",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", type=Path, help="configs/real/<setup>.yaml (camera, arm, safety)")
    p.add_argument("--sim", action="store_true", help="the simulated rig instead of hardware")
    p.add_argument("--robot", default="Panda", help="--sim: the simulated robot")
    p.add_argument("--kind", default="eye_to_hand", choices=["eye_to_hand", "eye_in_hand"])
    p.add_argument(
        "--board",
        default="6x5:25mm:18.5mm:DICT_4X4_50",
        help="squares x, y : square size : marker size : dictionary (measure your print)",
    )
    p.add_argument("--views", type=int, default=15, help="good views to collect")
    p.add_argument("--out", type=Path, default=None, help="directory for the calibration file")
    p.add_argument("--auto", action="store_true", help="the arm moves itself (real set-up)")
    p.add_argument("--auto-radius-m", type=float, default=0.08)
    p.add_argument("--auto-angle-deg", type=float, default=20.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--print-board", type=Path, default=None, help="write the board as a PNG to print, exit"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace, prompt: Callable[[str], str] = input) -> int:
    from calibration.board import CharucoBoardSpec, import_cv2

    board = CharucoBoardSpec.parse(args.board)
    if args.print_board is not None:
        cv2 = import_cv2()
        px = 236  # 20 mm squares at 300 dpi are 236 px; scale the print to the measured size
        cv2.imwrite(str(args.print_board), board.image(px_per_square=px, margin_px=px // 2))
        w, h = board.size_m
        print(
            f"wrote {args.print_board}: {board.squares_x}x{board.squares_y} squares; print it so "
            f"a square measures {board.square_m * 1e3:g} mm ({w * 1e3:g} x {h * 1e3:g} mm), "
            "glue it flat on a rigid plate, and measure the squares again"
        )
        return 0
    if args.sim:
        return _run_sim(args, board)
    if args.config is None:
        print("mu0 calibrate: give --config configs/real/<setup>.yaml, or --sim")
        return 2
    return _run_real(args, board, prompt)


def _report(result: Any, path: Path) -> None:
    q = result.quality()
    print(
        f"{result.kind}: {q['views_used']} views used, reprojection {q['reprojection_rms_px']:.3f} "
        f"px ({q['chain_rms_mm_at_board']:.2f} mm at the board) through the whole chain, "
        f"single views {q['pnp_rms_px']:.3f} px; leaving one view out moves it by up to "
        f"{q['leave_one_out_mm']:.2f} mm / {q['leave_one_out_deg']:.3f} deg; rotation spread "
        f"{q['rotation_spread_deg']:.0f} deg, {q['rotation_off_axis_deg']:.0f} deg off its main "
        f"axis ({q['method']})"
    )
    for view, reason in q["views_rejected"].items():
        print(f"  view {view} not used: {reason}")
    print(f"wrote {path}")
    reasons = "; ".join(q["warnings"]) or "every figure within the good limits"
    print(f"verdict: {q['verdict']} ({reasons})")


def _solve(session: Any) -> Any:
    """The session's result, or None after printing the refusal and its reason."""
    from calibration.handeye import CalibrationError

    try:
        return session.solve()
    except CalibrationError as e:
        print(f"verdict: refused ({e}); nothing written")
        return None


def _run_sim(args: argparse.Namespace, board: Any) -> int:
    import numpy as np

    from calibration.session import CaptureSession
    from calibration.transforms import pose_error
    from envs.charuco_sim import CharucoSimScene

    out = args.out or Path("calibration/sim")
    with CharucoSimScene(robot=args.robot, board=board) as scene:
        camera = scene.camera if args.kind == "eye_to_hand" else scene.wrist_camera
        shown = "gripper" if args.kind == "eye_to_hand" else "table"
        K, _ = scene.camera_params(camera)
        session = CaptureSession(args.kind, board, K, target_views=args.views)
        rng = np.random.default_rng(args.seed)
        home = scene.joint_positions()
        targets = scene.calibration_targets(args.kind, 3 * args.views, rng)
        for T in targets:
            if session.ready():
                break
            scene.set_joint_positions(home)
            if not scene.move_to(T):
                continue
            view = session.add(scene.render(camera, shown), scene.T_base_eef())
            print(f"  captured: {view!r} -> {session.advice()}")
        result = _solve(session)
        if result is None:
            return 1
        H, W = scene.image_hw
        calib = session.to_calibration(
            result, f"sim-{camera}", (W, H), camera_name=camera, robot=args.robot
        )
        path = calib.save(out)
        _report(result, path)
        truth = scene.truth.T_base_cam if args.kind == "eye_to_hand" else scene.truth.T_eef_cam
        trans_mm, rot_deg = pose_error(result.T_ref_cam, truth)
        print(f"against the simulator's truth: {trans_mm:.3f} mm, {rot_deg:.4f} deg")
    return 0


def _run_real(args: argparse.Namespace, board: Any, prompt: Callable[[str], str]) -> int:
    from calibration.intrinsics import intrinsics_of
    from calibration.session import CaptureSession, poses_around
    from configs.real import load_real_setup
    from envs.realsense import RealSenseCamera, RealSenseConfig
    from runtime.commands.run_real import build_arm

    setup = load_real_setup(args.config)
    out = args.out or Path(setup.calibration.path)
    if out.suffix == ".json":
        out = out.parent
    cam = setup.camera
    camera = RealSenseCamera(
        RealSenseConfig(serial=cam.serial, width=cam.width, height=cam.height, fps=cam.fps)
    ).connect()
    arm = build_arm(setup, dry_run=False)
    try:
        intr = intrinsics_of(camera)
        K = intr.K
        print(
            f"camera {intr.name} {intr.serial}: {intr.width}x{intr.height}, intrinsics from the "
            f"device fx {intr.fx:.2f} fy {intr.fy:.2f} cx {intr.cx:.2f} cy {intr.cy:.2f}, "
            f"depth unit {intr.depth_scale:g} m"
        )
        arm.connect()
        session = CaptureSession(args.kind, board, K, target_views=args.views)
        where = "on the gripper" if args.kind == "eye_to_hand" else "fixed on the table"
        print(f"board {where}; {args.views} good views wanted, varied in position and tilt")
        if args.auto:
            _auto_capture(args, session, camera, arm, prompt, poses_around)
        else:
            _manual_capture(session, camera, arm, prompt)
        if session.good < session.limits.min_views:
            print(f"only {session.good} good views; nothing written")
            return 1
        result = _solve(session)
        if result is None:
            return 1
        calib = session.to_calibration(
            result,
            camera.serial,
            camera.image_size,
            camera_name=camera.name,
            depth_scale=camera.depth_scale,
            robot=setup.name,
            distortion={"model": camera.distortion[0], "coeffs": list(camera.distortion[1])},
        )
        _report(result, calib.save(out))
        return 0
    finally:
        arm.disconnect()
        camera.disconnect()


def _capture(session: Any, camera: Any, arm: Any) -> Any:
    """One view: a fresh frame taken after the arm has come to rest, and its pose."""
    import numpy as np

    state = arm.read_state()
    camera.read()  # drop a frame that may have been exposed while moving
    frame = camera.read()
    after = arm.read_state()
    if not np.allclose(state.T_base_eef, after.T_base_eef, atol=1e-4):
        raise RuntimeError("the arm moved during the capture; hold it still and try again")
    return session.add(frame.rgb, after.T_base_eef)


def _manual_capture(session: Any, camera: Any, arm: Any, prompt: Callable[[str], str]) -> None:
    while True:
        answer = prompt(
            f"[{session.good}/{session.target_views}] Enter: capture, u: undo, s: solve, q: quit > "
        ).strip()
        if answer == "q":
            raise SystemExit("calibration abandoned")
        if answer == "u":
            session.undo()
            print(f"  dropped the last view -> {session.advice()}")
            continue
        if answer == "s":
            if session.good >= session.limits.min_views:
                return
            print(f"  need {session.limits.min_views} good views first")
            continue
        try:
            view = _capture(session, camera, arm)
        except RuntimeError as e:
            print(f"  {e}")
            continue
        print(f"  {view!r} -> {session.advice()}")
        if session.ready():
            print("  enough views: solving (or keep capturing: the next prompt will ask)")
            return


def _auto_capture(args, session, camera, arm, prompt, poses_around) -> None:
    import numpy as np

    start = arm.read_state().T_base_eef
    targets = poses_around(
        start, 2 * args.views, args.auto_radius_m, args.auto_angle_deg, args.seed
    )
    answer = prompt(
        f"the arm will move itself through up to {len(targets)} poses within "
        f"{args.auto_radius_m * 100:.0f} cm and {args.auto_angle_deg:.0f}° of where it is, "
        "through the safety limits; keep clear and hold the e-stop. Type yes to start > "
    )
    if answer.strip() != "yes":
        raise SystemExit("calibration abandoned")
    period = arm.config.command_period_s
    for T in targets + [start]:
        deadline = time.monotonic() + 20.0
        while time.monotonic() < deadline:  # servo to the target through the limits
            report = arm.command_eef(T)
            time.sleep(period)
            if report.T_sent is not None and np.allclose(report.T_sent, T, atol=1e-6):
                break
        arm.hold("settling for a capture")
        time.sleep(0.5)
        if T is start or session.ready():
            continue
        try:
            view = _capture(session, camera, arm)
        except RuntimeError as e:
            print(f"  {e}")
            continue
        print(f"  {view!r} -> {session.advice()}")
