"""Camera calibration: intrinsics from the device, ChArUco hand-eye, calibration files.

- `calibration.intrinsics`: the colour stream's intrinsics and depth unit, from the device;
- `calibration.board`: ChArUco boards, detection, single-view board poses (OpenCV);
- `calibration.handeye`: eye-to-hand (fixed camera) and eye-in-hand (wrist camera);
- `calibration.files`: timestamped JSON files the runtime loads and checks for staleness;
- `calibration.session`: the guided capture behind `mu0 calibrate`;
- `calibration.transforms`: rigid-transform helpers (numpy only).

Importing the package needs neither OpenCV nor a camera SDK; the modules that need OpenCV
raise an ImportError naming the `real` extra.
"""
