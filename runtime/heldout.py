"""The held-out trace set `mu0 eval-traces` builds when given no data: held-out seeds of the
trained tasks and robots, a task left out of pretraining (Door), and a robot left out of
pretraining (IIWA). Collected in simulation, extracted from pixels, built once and reused."""

from __future__ import annotations

from pathlib import Path

# split → (task, robot) pairs; seeds 1000+ are never used for training data.
HELDOUT = {
    "heldout_seeds": [("Lift", "Panda"), ("Stack", "UR5e"), ("PickPlaceCan", "Panda")],
    "heldout_task": [("Door", "Panda")],
    "heldout_robot": [("Lift", "IIWA"), ("Stack", "IIWA")],
}
SEED = 1000


def build_heldout_set(
    root: str | Path = "outputs/heldout", episodes: int = 3, image_size: int = 128
) -> Path:
    """→ a directory of trace datasets laid out as ``<split>/<task>-<robot>/``. Traces in an
    older dataset format are extracted again from the episodes already collected."""
    import shutil

    from envs.collect import CollectConfig, collect
    from mu0_core import trace_dataset
    from mu0_core.extract.pipeline import run_extract

    root = Path(root)
    for split, pairs in HELDOUT.items():
        for task, robot in pairs:
            name = f"{task}-{robot}"
            traces = root / "traces" / split / name
            if (traces / "meta.json").is_file():
                try:
                    trace_dataset.read_meta(traces)
                    continue
                except ValueError:  # an older format: cut the futures again
                    print(f"held-out {split}/{name}: old trace format, extracting again")
                    shutil.rmtree(traces)
            print(f"building held-out {split}: {name} ({episodes} episodes, seed {SEED}+)")
            episodes_dir = root / "episodes" / split / name
            cfg = CollectConfig(
                task=task,
                robot=robot,
                episodes=episodes,
                seed=SEED,
                image_size=(image_size, image_size),
                only_success=True,
            )
            collect(episodes_dir, cfg, progress=True)
            run_extract(episodes_dir, traces, workers=1)
    return root / "traces"
