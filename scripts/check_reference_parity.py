"""Check the published-μ0 port against a fixture made by the reference code.

    python scripts/check_reference_parity.py FIXTURE_DIR

FIXTURE_DIR holds release/ (final_ckpt + normalizer_stats.json), vlm/, dino/, inputs.npz and
outputs.npz (see ../shared/refparity/README.md). The raw inputs (rgb_raw, depth_m, prompts'
instructions, keypoints, history, mask, noise) go through the port's own preprocessing and
sampler, with and without history masked. Prints one JSON line of max abs errors; exits 0 only
when traces_abs and done_prob (both variants) are within the tolerance.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

TOLERANCE = 1e-4
# Run as a file (python scripts/...), the repository root is not on the path by itself.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def instruction_of(prompt: str) -> str:
    """Recover the instruction from the reference's "Task: ...\\n" prompt."""
    if not (prompt.startswith("Task: ") and prompt.endswith("\n")):
        raise SystemExit(f"prompt {prompt!r} is not of the form 'Task: ...\\n'")
    return prompt[len("Task: ") : -1]


def run(fixture: Path) -> dict[str, float]:
    from mu0_core.published.release import load_release

    rel = load_release(fixture / "release", fixture / "vlm", fixture / "dino")
    x = np.load(fixture / "inputs.npz")
    y = np.load(fixture / "outputs.npz")
    instructions = [instruction_of(str(p)) for p in x["prompts"]]
    errors: dict[str, float] = {}
    for suffix, mask_all in (("", False), ("_maskhist", True)):
        mask = torch.from_numpy(x["key_pad_mask"])
        out = rel.sample(
            torch.from_numpy(x["rgb_raw"]),
            x["depth_m"],
            instructions,
            torch.from_numpy(x["current_kp"]),
            torch.from_numpy(x["traj_history"]),
            mask,
            noise=torch.from_numpy(x["noise"]),
            history_mask=torch.zeros_like(mask) if mask_all else None,
            trace_steps=True,
        )
        for name in ("traces_abs", "done_prob"):
            got = out[name].cpu().numpy()
            # Padded keypoints carry no meaning (the reference leaves them unmasked noise).
            m = x["key_pad_mask"].reshape(x["key_pad_mask"].shape + (1,) * (got.ndim - 2))
            err = np.abs(got - y[name + suffix]) * m
            errors[name + suffix] = float(err.max())
        # Per-Euler-step velocities and the final control points, for locating a mismatch.
        m4 = x["key_pad_mask"][None, :, :, None, None]
        errors["step_v" + suffix] = float(
            (np.abs(out["step_v"].numpy() - y["step_v" + suffix]) * m4).max()
        )
        errors["ctrl" + suffix] = float(
            (np.abs(out["ctrl"].numpy() - y["ctrl" + suffix]) * m4[0]).max()
        )
        if not mask_all:
            p = out["prefix_embs"].cpu().numpy()
            pm = y["prefix_pad_mask"][..., None]
            errors["prefix_embs"] = float((np.abs(p - y["prefix_embs"]) * pm).max())
            if "dino_feat" in out:
                errors["dino_feat"] = float(
                    np.abs(out["dino_feat"].cpu().numpy() - y["dino_feat"]).max()
                )
    return errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument(
        "fixture", type=Path, help="directory with release/, vlm/, dino/, inputs.npz, outputs.npz"
    )
    parser.add_argument("--tolerance", type=float, default=TOLERANCE)
    args = parser.parse_args(argv)
    errors = run(args.fixture)
    gated = ("traces_abs", "done_prob", "traces_abs_maskhist", "done_prob_maskhist")
    ok = all(errors[k] <= args.tolerance for k in gated)
    print(json.dumps({**errors, "tolerance": args.tolerance, "pass": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
