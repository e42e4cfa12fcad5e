"""`mu0 run-real`: drive a real arm from a RealSense camera, a trace server and an action
expert at a fixed rate (runtime/real.py); ``--dry-run`` replays a recorded camera stream
and commands a virtual arm instead, so nothing moves."""

from __future__ import annotations

import argparse
import json
import logging
import signal
from pathlib import Path
from typing import Any


def add_parser(sub) -> None:
    p = sub.add_parser(
        "run-real",
        help="camera + calibration + trace client + action expert + arm at a fixed rate",
        description=(
            "Run a real-robot set-up (configs/real/<setup>.yaml). The camera's frames go to "
            "the trace server; the action expert turns the newest fresh trace into a chunk "
            "of end-effector targets (latency-compensated from the frame's capture time), "
            "sent through the safety layer at --rate. --dry-run replays a recorded camera "
            "stream (the set-up's camera.recording or --recording) and commands nothing."
        ),
    )
    p.add_argument("--config", type=Path, required=True, help="configs/real/<setup>.yaml")
    p.add_argument("--dry-run", action="store_true", help="recorded stream, no arm commanded")
    p.add_argument("--recording", type=Path, default=None, help="a .bag/.db3 to replay")
    p.add_argument("--server", default=None, help="override server.address")
    p.add_argument("--expert", default=None, help="override expert.path (a checkpoint dir)")
    p.add_argument("--rate", type=float, default=None, help="override rate_hz")
    p.add_argument(
        "--max-trace-age", type=float, default=None, help="override server.max_trace_age_s"
    )
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many ticks")
    p.add_argument("--duration-s", type=float, default=None, help="stop after this long")
    p.add_argument("--log", type=Path, default=None, help="one JSON line per tick here")
    p.add_argument("--json", type=Path, default=None, help="write the run's figures here")
    p.set_defaults(func=run)


def build_expert(setup: Any, override_path: str | None = None) -> Any:
    from runtime.real import FollowGripperTrace

    path = override_path or setup.expert.path
    if path is None:
        return FollowGripperTrace(pos_scale_m=setup.action.pos_scale_m)
    from policies import load_expert

    return load_expert(path, device=setup.expert.device)


def build_arm(setup: Any, dry_run: bool) -> Any:
    """A SafeArm around the set-up's backend, or around a virtual arm for a dry run."""
    from envs.arm import SafeArm, SimArm
    from runtime.real import T_from_pose6

    if dry_run or setup.arm.backend == "sim":
        inner = SimArm(
            T_from_pose6(setup.dry_run.start_eef_pose),
            num_joints=setup.arm.num_joints,
            gripper=setup.dry_run.start_gripper,
        )
    else:
        from envs.ur_arm import RobotiqGripper, URArm

        gripper = RobotiqGripper(setup.arm.host) if setup.arm.gripper == "robotiq" else None
        inner = URArm(
            setup.arm.host,
            frequency=setup.arm.frequency,
            servo_time_s=1.0 / setup.rate_hz,
            lookahead_s=setup.arm.lookahead_s,
            gain=setup.arm.gain,
            gripper=gripper,
        )
    from dataclasses import replace

    safety = replace(setup.safety, command_period_s=1.0 / setup.rate_hz)
    return SafeArm(inner, safety)


def build_client(setup: Any, address: str | None = None) -> Any:
    from runtime.client import ClientCurve, TraceClient

    srv = setup.server
    curve = None
    if srv.server_public_key or srv.client_secret_key:
        if not (srv.server_public_key and srv.client_secret_key):
            raise ValueError("server: CURVE needs both server_public_key and client_secret_key")
        curve = ClientCurve.from_files(srv.server_public_key, srv.client_secret_key)
    return TraceClient(
        address or srv.address,
        timeout_s=srv.timeout_s,
        curve=curve,
        max_age_s=srv.max_trace_age_s,
    )


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from calibration.files import load_calibration
    from configs.real import load_real_setup
    from envs.realsense import RealSenseCamera, RealSenseConfig
    from policies.queries import QueryBuilder
    from runtime.real import LoopSettings, RealLoop

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    setup = load_real_setup(args.config)
    if args.rate is not None:
        setup = replace(setup, rate_hz=args.rate)
    if args.max_trace_age is not None:
        setup = replace(setup, server=replace(setup.server, max_trace_age_s=args.max_trace_age))
    recording = str(args.recording) if args.recording else setup.camera.recording
    if args.dry_run and recording is None:
        print("--dry-run needs a recorded stream: --recording PATH or camera.recording")
        return 2
    cam_cfg = RealSenseConfig(
        serial=None if args.dry_run else setup.camera.serial,
        width=setup.camera.width,
        height=setup.camera.height,
        fps=setup.camera.fps,
        recording=recording if args.dry_run else None,
        real_time=True,  # the loop reads the newest frame; a recording plays at its pace
    )
    expert = build_expert(setup, args.expert)
    camera = RealSenseCamera(cam_cfg).connect()
    client = arm = None
    try:
        calib = load_calibration(
            setup.calibration.path,
            serial=None if args.dry_run else camera.serial,
            max_age_days=None if args.dry_run else setup.calibration.max_age_days,
        )
        if args.dry_run and calib.camera_serial != camera.serial:
            print(
                f"note: the recording's camera is {camera.serial}, the calibration's "
                f"{calib.camera_serial}"
            )
        calib.check_camera(
            None if args.dry_run else camera.serial,
            camera.intrinsics,
            camera.image_size,
            tol_px=setup.calibration.tolerance_px,
        )
        client = build_client(setup, args.server)
        try:
            hello = client.hello()
        except TimeoutError:
            print(
                f"no answer from the trace server at {client.address} within "
                f"{setup.server.timeout_s:g} s: is it running and reachable, and does it allow "
                "this robot's CURVE key?"
            )
            return 1
        size = hello.get("image_size")
        client.start_stream()
        arm = build_arm(setup, args.dry_run).connect()
        settings = LoopSettings(
            rate_hz=setup.rate_hz,
            max_trace_age_s=setup.server.max_trace_age_s,
            send_size_wh=tuple(size) if size else None,
            send_max_side=setup.server.send_max_side,
            pos_scale_m=setup.action.pos_scale_m,
            rot_scale_rad=setup.action.rot_scale_rad,
            gripper_open=setup.proprio.gripper_open,
            gripper_closed=setup.proprio.gripper_closed,
            expert_frame_yaw_deg=setup.arm.expert_frame_yaw_deg,
            expert_seed=setup.expert.seed,
        )
        loop = RealLoop(
            camera,
            arm,
            client,
            expert,
            calib,
            QueryBuilder(setup.queries.scene_points),
            setup.instruction,
            settings,
            log_path=args.log,
        )
        if args.dry_run:
            mode = "DRY RUN (virtual arm, nothing commanded)"
        elif setup.arm.backend == "sim":
            mode = "LIVE camera, virtual arm (arm.backend: sim)"
        else:
            mode = f"LIVE ({setup.arm.backend} at {setup.arm.host})"
        print(
            f"{mode}: {setup.name}, {setup.rate_hz:g} Hz, server {client.address} "
            f"({hello.get('model_id')}), camera {camera.serial} {camera.image_size}, "
            f"calibration {calib.kind} from {calib.created_at:%Y-%m-%d}"
        )
        # SIGTERM ends the loop like Ctrl-C: the arm is held, then everything released.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        summary = loop.run(max_ticks=args.max_steps, duration_s=args.duration_s)
    finally:
        if arm is not None:
            arm.disconnect()
        if client is not None:
            client.close()
        camera.disconnect()
    figures = summary.figures()
    figures.update({"setup": setup.name, "dry_run": bool(args.dry_run), "rate_hz": setup.rate_hz})
    _print(figures)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0 if not figures["ended_by"].startswith("emergency") else 1


def _print(f: dict) -> None:
    print(
        f"ended by {f['ended_by']}: {f['ticks']} ticks, {f['frames_sent']} frames sent, "
        f"{f['chunks']} chunks, {f['commands_sent']} targets sent, {f['holds']} holds "
        f"{f['hold_reasons']}, {f['dropped_late_actions']} late actions dropped, "
        f"{f['overruns']} overruns"
    )
    print(
        f"trace age p50 {f['trace_age_ms_p50']} ms (p90 {f['trace_age_ms_p90']}), round trip "
        f"p50 {f['trace_rtt_ms_p50']} ms, expert p50 {f['expert_ms_p50']} ms, tick p50 "
        f"{f['tick_ms_p50']} ms; commanded path {f['commanded_path_m']} m at up to "
        f"{f['commanded_max_speed_m_s']} m/s"
    )
