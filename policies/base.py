"""The shared base of the per-embodiment action experts: a small flow-matching policy over
action chunks, conditioned on predicted 3D traces, proprioception and the instruction.

Inputs (`ExpertObservation`), all in the robot's base frame:

    traces_base   float32[N, T, 3]  future traces of N query points (metres); point 0 is the
                                    gripper (its grip site), the others are scene points
    trace_valid   bool[N]           False for a point the model could not place
    proprio       float32[D]        the env's proprio vector (envs.robosuite_env), whose
                                    first 7 entries are eef_pos_base[3], eef_quat_base_xyzw[4]
    instruction   str               one of the instructions the expert was trained on
    traces_available  bool          False: no trace (the `no_trace` condition, or a stale one)
    point_rgb     float32[N, 3]     each query's colour in [0, 1] where it is now
                                    (`policies.queries.point_colors`); needed with traces
                                    when the expert was trained with ``point_colors``

Output: float32[chunk, 7] actions in the env's convention (OSC_POSE delta in the base frame,
1 ↔ 5 cm or 0.5 rad per step; gripper -1 open, +1 close); execute the first ``execute``.

Traces enter as per-point features, in decimetres: where the point is now relative to the
gripper, where it is in the base frame (``absolute_points``: the height above the table is what
tells the object from the table it stands on), and where it will be at ``trace_steps`` samples
of the horizon relative to now; with ``point_colors``, also the point's colour in the image
(positions alone tell the red cube from the green one only by size). A set encoder (per-point
MLP, then attention pooling with a learned query) makes the order of the scene points
irrelevant. During training the whole trace context is replaced with a learned "no trace"
vector with probability ``trace_dropout``, so one network serves both the trace-conditioned
and the trace-free conditions, and holds a sensible policy when traces go stale.

Traces longer than nearly all the expert trained on are shortened to that length
(``future_clip_m``, per trace step): a network extrapolates badly, and μ0's forecasts move far
less than the truth, so without this the ground-truth traces of the ``oracle`` condition made
the arm flail.

Traces are easy to ignore: imitation from a few dozen demonstrations fits the actions from
proprioception alone nearly as well (measured: held-out action losses within 1-3% of each other
with and without traces), and the robot then reaches where the object usually is, not where it
is. So the trace encoding is also trained (weight ``goal_weight``) to say where the gripper
will be at the end of the current motion segment — at its next open/close, or the episode's
end — and, with ``goal_rotation``, how it will have turned by then (a grasp must match the
object's yaw), both read off the recorded proprioception: an auxiliary target from the
demonstration itself, never a ground-truth trace.

Knowing the goal is not yet going there: a UR5e expert whose goal head placed the first grasp
0.3-1.6 cm from the red cube at the start of each of 12 Stack episodes (seeds 5000-5011) still
lowered its gripper onto the green cube in the one it recorded. So with ``goal_input`` the
predicted goal also enters the action head's context, as a sub-goal for the action chunk (a
learned "no goal" vector where there are no traces); the action loss does not flow back into
the goal head.

The instruction is embedded by lookup among the instructions seen in training (an expert
serves a fixed task set); an unknown one is an error that lists the known ones.
Checkpoints: safetensors + JSON config (no pickle), like μ0's.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

TRACE_SCALE_M = 0.1  # traces and positions enter the network in decimetres
EEF_DIMS = 7  # eef_pos_base[3] + eef_quat_base_xyzw[4] lead every proprio vector
ACTION_DIM = 7


@dataclass
class ExpertObservation:
    traces_base: np.ndarray  # float32[N, T, 3]
    trace_valid: np.ndarray  # bool[N]
    proprio: np.ndarray  # float32[D]
    instruction: str
    traces_available: bool = True
    point_rgb: np.ndarray | None = None  # float32[N, 3] in [0, 1]


@dataclass
class ActionExpertConfig:
    embodiment: str
    proprio_dim: int
    instructions: list[str]
    chunk: int = 16  # actions predicted per call (the reference's 16)
    execute: int = 8  # actions executed before the next call (the reference's 8)
    trace_steps: list[int] = field(default_factory=lambda: [1, 3, 7, 11, 15, 19, 23, 31])
    max_points: int = 33
    width: int = 256
    point_width: int = 128
    depth: int = 3
    trace_dropout: float = 0.3
    # Training only: each scene point is dropped with this probability, and every point is
    # shifted by Gaussian noise of this size (m), so the expert cannot memorise the exact
    # point sets of a few dozen demonstrations.
    point_dropout: float = 0.2
    trace_jitter_m: float = 0.005
    flow_steps: int = 10
    # Each point's base-frame position joins its features (experts saved before this option
    # existed load with it off: see from_dict).
    absolute_points: bool = True
    point_colors: bool = True  # each point's colour (ExpertObservation.point_rgb) joins too
    # Training only: weight of the segment-goal auxiliary loss (module docstring); 0 = off.
    goal_weight: float = 1.0
    goal_rotation: bool = True  # the goal also has the rotation (rad) to the segment's end
    # The predicted segment goal also enters the action head's context (module docstring).
    # Training only: half the samples get the recorded goal shifted by Gaussian noise of
    # ``goal_input_noise_m`` (m; ten times that number in rad for the rotation) instead of
    # the prediction, so the head learns to follow a goal before the prediction is any good.
    goal_input: bool = True
    goal_input_noise_m: float = 0.01
    proprio_mean: list[float] | None = None
    proprio_std: list[float] | None = None
    # How far (m) the traces it trained on go at each of ``trace_steps`` (their 99.9th
    # percentile): longer ones are shortened to it, as the network never learned what they
    # mean (set by train-expert; None = no limit).
    future_clip_m: list[float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ActionExpertConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown action-expert config keys: {sorted(unknown)}")
        # Experts saved before these options existed: relative point features, no goal head.
        legacy = {
            "absolute_points": False,
            "point_colors": False,
            "goal_weight": 0.0,
            "goal_rotation": False,
            "goal_input": False,
        }
        return cls(**{**legacy, **d})


def _time_embedding(t: Tensor, dim: int) -> Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(1000.0) * torch.arange(half, device=t.device) / half)
    ang = t[:, None] * freqs[None] * 1000.0
    return torch.cat([ang.sin(), ang.cos()], dim=-1)


class _Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width)
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.mlp(self.norm(x))


class TraceSetEncoder(nn.Module):
    """[B, N, F] per-point features + mask → [B, width] (order of scene points irrelevant)."""

    def __init__(self, in_dim: int, point_width: int, width: int):
        super().__init__()
        self.point = nn.Sequential(
            nn.Linear(in_dim + 1, point_width),
            nn.GELU(),
            nn.Linear(point_width, point_width),
            nn.GELU(),
            nn.Linear(point_width, point_width),
        )
        self.gripper = nn.Sequential(nn.Linear(in_dim, point_width), nn.GELU())
        self.query = nn.Parameter(torch.randn(4, point_width) * 0.02)
        self.out = nn.Linear(4 * point_width + point_width, width)

    def forward(self, feats: Tensor, mask: Tensor) -> Tensor:
        B, N, _ = feats.shape
        is_gripper = torch.zeros(B, N, 1, device=feats.device)
        is_gripper[:, 0] = 1.0
        h = self.point(torch.cat([feats, is_gripper], dim=-1))  # [B, N, P]
        logits = torch.einsum("qp,bnp->bqn", self.query, h) / math.sqrt(h.shape[-1])
        logits = logits.masked_fill(~mask[:, None, :], -1e9)
        w = logits.softmax(dim=-1) * mask[:, None, :].any(-1, keepdim=True)
        pooled = torch.einsum("bqn,bnp->bqp", w, h).reshape(B, -1)
        grip = self.gripper(feats[:, 0]) * mask[:, :1]
        return self.out(torch.cat([pooled, grip], dim=-1))


class ActionExpert(nn.Module):
    """Flow matching over action chunks; see the module docstring."""

    def __init__(self, cfg: ActionExpertConfig):
        super().__init__()
        self.cfg = cfg
        W = cfg.width
        point_in = (
            (6 if cfg.absolute_points else 3)
            + (3 if cfg.point_colors else 0)
            + 3 * len(cfg.trace_steps)
        )
        self.traces = TraceSetEncoder(point_in, cfg.point_width, W)
        self.no_trace = nn.Parameter(torch.zeros(W))
        goal_dim = 6 if cfg.goal_rotation else 3
        self.goal = (
            nn.Sequential(nn.Linear(W, W), nn.GELU(), nn.Linear(W, goal_dim))
            if cfg.goal_weight > 0
            else None
        )
        self.goal_in = None
        if cfg.goal_input:
            if self.goal is None:
                raise ValueError("goal_input needs the goal head (goal_weight > 0)")
            self.goal_in = nn.Sequential(nn.Linear(goal_dim, W), nn.GELU(), nn.Linear(W, W))
            self.no_goal = nn.Parameter(torch.zeros(W))
        self.proprio = nn.Sequential(nn.Linear(cfg.proprio_dim, W), nn.GELU(), nn.Linear(W, W))
        self.instruction = nn.Embedding(len(cfg.instructions), W)
        n_ctx = 4 if cfg.goal_input else 3
        self.context = nn.Sequential(nn.Linear(n_ctx * W, W), nn.GELU(), nn.Linear(W, W))
        self.time = nn.Linear(64, W)
        self.action_in = nn.Linear(cfg.chunk * ACTION_DIM, W)
        self.blocks = nn.ModuleList(_Block(W) for _ in range(cfg.depth))
        self.head = nn.Sequential(nn.LayerNorm(W), nn.Linear(W, cfg.chunk * ACTION_DIM))
        nn.init.zeros_(self.head[1].weight)
        nn.init.zeros_(self.head[1].bias)
        mean = cfg.proprio_mean or [0.0] * cfg.proprio_dim
        std = cfg.proprio_std or [1.0] * cfg.proprio_dim
        self.register_buffer("p_mean", torch.tensor(mean, dtype=torch.float32), persistent=False)
        self.register_buffer("p_std", torch.tensor(std, dtype=torch.float32), persistent=False)
        clip = None
        if cfg.future_clip_m is not None:
            if len(cfg.future_clip_m) != len(cfg.trace_steps):
                raise ValueError(
                    f"future_clip_m needs one length per trace step ({len(cfg.trace_steps)}), "
                    f"got {len(cfg.future_clip_m)}"
                )
            clip = torch.tensor(cfg.future_clip_m, dtype=torch.float32)
        self.register_buffer("f_clip", clip, persistent=False)

    # -- properties the control loop reads ----------------------------------------------
    @property
    def embodiment(self) -> str:
        return self.cfg.embodiment

    @property
    def chunk(self) -> int:
        return self.cfg.chunk

    @property
    def execute(self) -> int:
        return self.cfg.execute

    @property
    def device(self) -> torch.device:
        return self.no_trace.device

    # -- features --------------------------------------------------------------------------
    def point_features(
        self, traces: Tensor, eef_pos: Tensor, point_rgb: Tensor | None = None
    ) -> Tensor:
        """traces [B, N, T, 3] (base frame, m), eef_pos [B, 3], point_rgb [B, N, 3] in [0, 1]
        → [B, N, 3 (+ 3) + 3 S (+ 3)]."""
        now = traces[:, :, 0]  # the first horizon step is where the point is now
        steps = torch.as_tensor(self.cfg.trace_steps, device=traces.device)
        steps = steps.clamp(max=traces.shape[2] - 1)
        fut = traces[:, :, steps] - now[:, :, None]  # [B, N, S, 3]
        if self.f_clip is not None:
            norm = fut.norm(dim=-1, keepdim=True).clamp_min(1e-9)
            fut = fut * (self.f_clip[:, None] / norm).clamp(max=1.0)
        parts = [now - eef_pos[:, None]] + ([now] if self.cfg.absolute_points else [])
        feats = torch.cat([*parts, fut.flatten(2)], dim=-1) / TRACE_SCALE_M
        if not self.cfg.point_colors:
            return feats
        if point_rgb is None or point_rgb.shape != now.shape:
            raise ValueError(
                f"this {self.cfg.embodiment} expert was trained with point colours: it needs "
                f"point_rgb [B, N, 3] beside traces {list(traces.shape)}, got "
                f"{None if point_rgb is None else list(point_rgb.shape)}"
            )
        return torch.cat([feats, 2 * point_rgb - 1], dim=-1)

    def encode_context(
        self,
        traces: Tensor,
        trace_valid: Tensor,
        proprio: Tensor,
        instruction_ids: Tensor,
        traces_available: Tensor,
        point_rgb: Tensor | None = None,
    ) -> Tensor:
        """traces [B, N, T, 3], trace_valid [B, N], proprio [B, D], instruction_ids [B],
        traces_available bool[B], point_rgb [B, N, 3] → context [B, W]."""
        code = self.trace_code(traces, trace_valid, proprio[:, :3], point_rgb)
        goal = self.goal(code) if self.goal_in is not None else None
        return self._context(code, trace_valid, proprio, instruction_ids, traces_available, goal)

    def trace_code(
        self,
        traces: Tensor,
        trace_valid: Tensor,
        eef_pos: Tensor,
        point_rgb: Tensor | None = None,
    ) -> Tensor:
        """The set encoding of the traces: [B, W]."""
        feats = self.point_features(traces, eef_pos, point_rgb)
        feats = torch.nan_to_num(feats).clamp(-20, 20)
        return self.traces(feats, trace_valid)

    def _context(
        self,
        tr: Tensor,
        trace_valid: Tensor,
        proprio: Tensor,
        instruction_ids: Tensor,
        traces_available: Tensor,
        goal: Tensor | None = None,
    ) -> Tensor:
        """``goal``: [B, 3 or 6] segment goal as the goal head gives it (relative to the
        gripper, decimetres, then rad), for an expert with ``goal_input``."""
        use = (traces_available & trace_valid.any(-1))[:, None]
        tr = torch.where(use, tr, self.no_trace.expand_as(tr))
        p = self.proprio((proprio - self.p_mean) / self.p_std)
        parts = [tr, p, self.instruction(instruction_ids)]
        if self.goal_in is not None:
            g = self.goal_in(goal)
            parts.append(torch.where(use, g, self.no_goal.expand_as(g)))
        return self.context(torch.cat(parts, dim=-1))

    def velocity(self, x_t: Tensor, t: Tensor, ctx: Tensor) -> Tensor:
        h = self.action_in(x_t.flatten(1)) + self.time(_time_embedding(t, 64)) + ctx
        for block in self.blocks:
            h = block(h)
        return self.head(h).view_as(x_t)

    # -- training ---------------------------------------------------------------------------
    def loss(
        self,
        batch: dict[str, Tensor],
        generator: torch.Generator | None = None,
        traces: bool | None = None,
    ) -> Tensor:
        """Flow matching: x_t = (1 - t) ε + t a, the network predicts a - ε; plus the
        segment-goal loss when the batch has ``goal`` [B, 3] (base frame, m) and ``goal_rot``
        [B, 3] (rad) and the config a ``goal_weight``. ``batch``: traces, trace_valid, proprio,
        instruction_ids, actions [B, chunk, 7], action_mask [B, chunk] (, goal, goal_rot).
        ``traces``: None drops them with ``trace_dropout``; True or False for every sample."""
        a = batch["actions"]
        B = a.shape[0]
        dev = a.device
        if traces is None:
            available = torch.rand(B, device=dev, generator=generator) >= self.cfg.trace_dropout
        else:
            available = torch.full((B,), traces, dtype=torch.bool, device=dev)
        tr, valid = batch["traces"], batch["trace_valid"]
        if self.training:
            N = tr.shape[1]
            keep = torch.rand(B, N, device=dev, generator=generator) >= self.cfg.point_dropout
            keep[:, 0] = True  # the gripper stays
            valid = valid & keep
            shift = torch.randn(B, N, 1, 3, device=dev, generator=generator)
            tr = tr + self.cfg.trace_jitter_m * shift
        eef = batch["proprio"][:, :3]
        code = self.trace_code(tr, valid, eef, batch.get("point_rgb"))
        aux = a.new_zeros(())
        pred_goal = self.goal(code) if self.goal is not None else None
        goal_in = None
        if self.goal_in is not None:
            goal_in = pred_goal.detach()  # the action loss does not train the goal head
        if pred_goal is not None and "goal" in batch:
            target = (batch["goal"] - eef) / TRACE_SCALE_M
            if self.cfg.goal_rotation:
                target = torch.cat([target, batch["goal_rot"]], dim=-1)
            has = valid.any(-1).float()
            err_goal = ((pred_goal - target) ** 2).mean(-1)
            aux = self.cfg.goal_weight * (err_goal * has).sum() / has.sum().clamp(min=1)
            if goal_in is not None and self.training:
                # Half the samples follow the recorded goal, noised (see the config).
                sigma = torch.full_like(target, self.cfg.goal_input_noise_m / TRACE_SCALE_M)
                sigma[:, 3:] = self.cfg.goal_input_noise_m * 10
                noised = target + sigma * torch.randn(target.shape, device=dev, generator=generator)
                teach = torch.rand(B, 1, device=dev, generator=generator) < 0.5
                goal_in = torch.where(teach, noised, goal_in)
        ctx = self._context(
            code, valid, batch["proprio"], batch["instruction_ids"], available, goal_in
        )
        eps = torch.randn(a.shape, device=dev, generator=generator)
        t = torch.rand(B, device=dev, generator=generator)
        x_t = (1 - t)[:, None, None] * eps + t[:, None, None] * a
        v = self.velocity(x_t, t, ctx)
        err = ((v - (a - eps)) ** 2).mean(-1)  # [B, chunk]
        m = batch["action_mask"].float()
        return (err * m).sum() / m.sum().clamp(min=1) + aux

    # -- inference ---------------------------------------------------------------------------
    def instruction_id(self, instruction: str) -> int:
        try:
            return self.cfg.instructions.index(instruction)
        except ValueError:
            raise ValueError(
                f"the {self.embodiment} expert was not trained on the instruction "
                f"{instruction!r}; it knows {self.cfg.instructions}"
            ) from None

    @torch.no_grad()
    def predict_goal(
        self,
        traces: Tensor,
        trace_valid: Tensor,
        eef_pos: Tensor,
        point_rgb: Tensor | None = None,
    ) -> Tensor | None:
        """Where the expert expects the gripper at the end of the current motion segment
        (base frame, m): [B, 3], or None for an expert trained without the goal loss."""
        if self.goal is None:
            return None
        code = self.trace_code(traces, trace_valid, eef_pos, point_rgb)
        return eef_pos + self.goal(code)[:, :3] * TRACE_SCALE_M

    @torch.no_grad()
    def sample(self, ctx: Tensor, generator: torch.Generator | None = None) -> Tensor:
        B = ctx.shape[0]
        x = torch.randn(B, self.cfg.chunk, ACTION_DIM, device=ctx.device, generator=generator)
        n = self.cfg.flow_steps
        for k in range(n):
            t = torch.full((B,), k / n, device=ctx.device)
            x = x + self.velocity(x, t, ctx) / n
        return x.clamp(-1, 1)

    @torch.no_grad()
    def act(self, obs: ExpertObservation, seed: int | None = None) -> np.ndarray:
        """One observation → float32[chunk, 7] actions (execute the first ``execute``)."""
        dev = self.device
        proprio = np.asarray(obs.proprio, np.float32)
        if proprio.shape != (self.cfg.proprio_dim,):
            raise ValueError(
                f"the {self.embodiment} expert expects proprio[{self.cfg.proprio_dim}], "
                f"got {list(proprio.shape)}"
            )
        traces = np.asarray(obs.traces_base, np.float32)
        valid = np.asarray(obs.trace_valid, bool)
        if traces.ndim != 3 or traces.shape[-1] != 3 or valid.shape != traces.shape[:1]:
            raise ValueError(
                f"traces_base must be [N, T, 3] with trace_valid [N], got "
                f"{list(traces.shape)} and {list(valid.shape)}"
            )
        traces, valid = traces[: self.cfg.max_points], valid[: self.cfg.max_points]
        rgb = None
        if self.cfg.point_colors:
            if obs.point_rgb is None and obs.traces_available:
                raise ValueError(
                    f"this {self.embodiment} expert was trained with point colours: pass "
                    "ExpertObservation.point_rgb (policies.queries.point_colors of the request)"
                )
            rgb = np.zeros(traces.shape[:1] + (3,), np.float32)
            if obs.point_rgb is not None:
                given = np.asarray(obs.point_rgb, np.float32)
                if given.ndim != 2 or given.shape[1] != 3 or len(given) < len(traces):
                    raise ValueError(f"point_rgb must be [N, 3], got {list(given.shape)}")
                rgb = given[: len(traces)]
            rgb = torch.from_numpy(rgb)[None].to(dev)
        ctx = self.encode_context(
            torch.from_numpy(traces)[None].to(dev),
            torch.from_numpy(valid)[None].to(dev),
            torch.from_numpy(proprio)[None].to(dev),
            torch.tensor([self.instruction_id(obs.instruction)], device=dev),
            torch.tensor([bool(obs.traces_available)], device=dev),
            rgb,
        )
        gen = None
        if seed is not None:
            gen = torch.Generator(device=dev).manual_seed(seed)
        return self.sample(ctx, gen)[0].cpu().numpy().astype(np.float32)


# -- checkpoints -----------------------------------------------------------------------------

CONFIG_FILE = "expert.json"
WEIGHTS_FILE = "expert.safetensors"


def save_expert(
    expert: ActionExpert, path: str | Path, extra: dict[str, Any] | None = None
) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in expert.state_dict().items()}
    save_file(state, str(path / (WEIGHTS_FILE + ".tmp")))
    (path / (WEIGHTS_FILE + ".tmp")).replace(path / WEIGHTS_FILE)
    meta = {"format": "mu0-action-expert", "version": 1, "config": expert.cfg.to_dict()}
    meta.update(extra or {})
    tmp = path / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    tmp.replace(path / CONFIG_FILE)
    return path


def load_expert(path: str | Path, device: str = "cpu") -> ActionExpert:
    """An expert directory (``expert.json`` + ``expert.safetensors``) → ActionExpert in eval mode."""
    path = Path(path)
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path} is not an action-expert checkpoint (no {CONFIG_FILE})")
    meta = json.loads(cfg_file.read_text())
    if meta.get("format") != "mu0-action-expert":
        raise ValueError(f"{cfg_file}: not an action-expert checkpoint")
    expert = ActionExpert(ActionExpertConfig.from_dict(meta["config"]))
    state = load_file(str(path / WEIGHTS_FILE))
    missing, unexpected = expert.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: missing keys {missing}, unexpected keys {unexpected}")
    return expert.to(device).eval()
