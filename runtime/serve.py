"""`mu0 serve` (host a model as a trace server) and `mu0 keys` (make CURVE key pairs).

The model loads once, lazily inside ``run`` so ``mu0 --help`` stays instant; SIGINT and
SIGTERM stop the server cleanly. ``python -m runtime.serve ...`` runs the same command
without the rest of the CLI (tests and benchmarks start servers that way).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from pathlib import Path

from runtime import wire


class _JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, event and the event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": getattr(record, "event", None),
        }
        fields = getattr(record, "fields", None)
        if fields:
            out.update(
                {
                    k: v if isinstance(v, (int, float, bool, str, type(None))) else str(v)
                    for k, v in fields.items()
                }
            )
        else:
            out["message"] = record.getMessage()
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(json_lines: bool, level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger("mu0")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=Path, help="μ0 checkpoint directory (not with --trivial)")
    p.add_argument(
        "--preset", default=None, help="serve an untrained model preset (benchmarks only)"
    )
    add_release_args(p)
    p.add_argument("--device", default="cpu", help="cuda | cuda:N | cpu (default cpu)")
    p.add_argument(
        "--noise-scale",
        type=float,
        default=None,
        help="sampler temperature: the flow starts from N(0, s^2) (default: the checkpoint's)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default torch's; use 1 when simulators share the cores)",
    )
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default loopback)")
    p.add_argument("--port", type=int, default=5555, help="ROUTER port (0 picks a free one)")
    p.add_argument(
        "--pub-port", type=int, default=None, help="also publish every trace on this PUB port"
    )
    p.add_argument(
        "--batch-window-ms", type=float, default=2.0, help="wait this long for a fuller batch"
    )
    p.add_argument(
        "--max-batch", type=int, default=16, help="most requests per forward pass (1 = no batching)"
    )
    p.add_argument("--max-message-mb", type=float, default=wire.DEFAULT_MAX_MESSAGE_BYTES / 2**20)
    p.add_argument(
        "--inline-below-ms",
        type=float,
        default=1.0,
        help="run batches of a model this fast without a helper watching the socket (0 = never)",
    )
    p.add_argument(
        "--rate-limit-hz", type=float, default=200.0, help="per-client requests/s (0 = off)"
    )
    p.add_argument(
        "--curve-dir", type=Path, help="directory with server.key_secret; turns CURVE on"
    )
    p.add_argument(
        "--allow-client-key",
        type=Path,
        action="append",
        default=[],
        help="client public key file or directory of *.key (repeatable; default CURVE_DIR/clients)",
    )
    p.add_argument("--log-json", action="store_true", help="structured logs as JSON lines")
    p.add_argument("--trivial", action="store_true", help="serve EchoTraceModel (transport tests)")
    p.add_argument(
        "--trivial-compute-ms", type=float, default=0.0, help="EchoTraceModel sleep per batch"
    )
    p.add_argument("--port-file", type=Path, help="write the bound ports here as JSON once serving")


def add_release_args(p: argparse.ArgumentParser) -> None:
    """Flags for a published-μ0 release given as --checkpoint (docs/published-mu0.md)."""
    p.add_argument(
        "--vlm-dir", type=Path, help="published μ0: local SmolVLM2-2.2B-Instruct config + tokenizer"
    )
    p.add_argument("--dino-dir", type=Path, help="published μ0: local dinov2-base config")


def load_published(args: argparse.Namespace, device: str = "cpu", **kwargs):
    """The published-μ0 adapter for --checkpoint RELEASE_DIR; exits with what to fix."""
    from mu0_core.published.release import ReleaseError
    from runtime.published_adapter import PublishedTraceModel

    if args.vlm_dir is None:
        raise SystemExit(
            f"{args.checkpoint} is a published μ0 release: give --vlm-dir (and --dino-dir), "
            "see docs/published-mu0.md"
        )
    try:
        return PublishedTraceModel.from_release(
            args.checkpoint, args.vlm_dir, args.dino_dir, device, **kwargs
        )
    except ReleaseError as e:
        raise SystemExit(f"mu0: {e}") from None


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="serve μ0 traces over ZeroMQ (long-running)")
    _configure(p)
    p.set_defaults(func=run)
    return p


def add_keys_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("keys", help="create a CURVE key pair (server or client)")
    p.add_argument("directory", type=Path, help="where to write NAME.key and NAME.key_secret")
    p.add_argument("--name", default="server", help="key file stem (default server)")
    p.set_defaults(func=run_keys)
    return p


def run_keys(args: argparse.Namespace) -> int:
    import zmq.auth

    args.directory.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(args.directory, args.name)
    Path(secret).chmod(0o600)
    print(f"public: {public}\nsecret: {secret}")
    return 0


def _load_model(args: argparse.Namespace):
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    if args.trivial:
        from runtime.model_api import EchoTraceModel

        return EchoTraceModel(compute_s=args.trivial_compute_ms / 1e3)
    from runtime.mu0_adapter import Mu0TraceModel

    if args.checkpoint is not None:
        from mu0_core.published.release import is_release_dir

        if is_release_dir(args.checkpoint):
            if args.noise_scale is not None:
                raise SystemExit(
                    "mu0 serve: the published μ0 samples from N(0, 1); drop --noise-scale"
                )
            return load_published(args, args.device)
        return Mu0TraceModel.from_checkpoint(
            args.checkpoint, args.device, noise_scale=args.noise_scale
        )
    if args.preset is not None:
        # An untrained preset: right shapes and real latency, meaningless traces.
        from configs.models import trainable_config
        from mu0_core.model import Mu0

        model = Mu0(trainable_config(args.preset)).to(args.device).eval()
        return Mu0TraceModel(model, noise_scale=args.noise_scale)
    raise SystemExit(
        "mu0 serve: give --checkpoint PATH (or --preset NAME / --trivial for stand-ins)"
    )


def run(args: argparse.Namespace) -> int:
    from runtime.server import CurveConfig, TraceServer, log_event, return_large_buffers_to_the_os

    setup_logging(args.log_json)
    return_large_buffers_to_the_os()
    curve = None
    if args.curve_dir is not None:
        allowed = args.allow_client_key or [args.curve_dir / "clients"]
        curve = CurveConfig.from_files(args.curve_dir / "server.key_secret", allowed)
    t0 = time.monotonic()
    model = _load_model(args)
    log_event(logging.INFO, "model_loaded", seconds=round(time.monotonic() - t0, 3))
    server = TraceServer(
        model,
        host=args.host,
        port=args.port,
        batch_window_ms=args.batch_window_ms,
        max_batch=args.max_batch,
        max_message_bytes=int(args.max_message_mb * 2**20),
        rate_limit_hz=args.rate_limit_hz,
        curve=curve,
        pub_port=args.pub_port,
        inline_below_ms=args.inline_below_ms,
    )

    def stop(signum: int, _frame: object) -> None:
        log_event(logging.INFO, "signal", name=signal.Signals(signum).name)
        server.shutdown()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    # On this (the inference) thread, before the port file says the server is up.
    log_event(logging.INFO, "warmed_up", infer_ms=server.warm_up())
    server.start(inference_thread=False)  # serve_forever runs inference on this thread
    if args.port_file is not None:
        tmp = args.port_file.with_suffix(".tmp")  # rename so readers never see half a file
        tmp.write_text(json.dumps({"port": server.port, "pub_port": server.pub_port}))
        tmp.replace(args.port_file)
    server.serve_forever()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.serve", description=__doc__)
    _configure(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
