"""Flow matching (rectified flow) in control-point space.

Convention: ``x_t = t * x1 + (1 - t) * x0`` with x0 ~ N(0, I) noise at t = 0 and the data x1
at t = 1; the target velocity is ``x1 - x0``. Training time follows pi0: u ~ Beta(1.5, 1) and
t = s (1 - u), s = 0.999, so noisy times (small t) are drawn more often. Inference integrates
with a fixed number of Euler steps from t = 0 to t = 1.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

TIME_SCALE = 0.999  # keeps t < 1 so the target never sits exactly on the data


def sample_time(
    batch_size: int,
    a: float = 1.5,
    b: float = 1.0,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> Tensor:
    """[B] flow times in [0, 0.999), density skewed towards noise (small t) for a > b."""
    uniform = torch.rand(batch_size, device=device, generator=generator)
    if b == 1.0:
        u = uniform ** (1.0 / a)  # inverse CDF of Beta(a, 1): F(u) = u^a
    else:
        # No inverse CDF in closed form; seed torch's Beta sampler from the generator's draw.
        seed = int(uniform[0].item() * 2**31) if generator is not None else None
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            u = torch.distributions.Beta(a, b).sample((batch_size,)).to(device)
    return TIME_SCALE * (1.0 - u)


def interpolate(x0: Tensor, x1: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """(x_t, target velocity) for t: [B] broadcast over x's trailing dims."""
    tt = t.view(-1, *([1] * (x1.ndim - 1)))
    return tt * x1 + (1.0 - tt) * x0, x1 - x0


def euler_sample(
    velocity_fn: Callable[[Tensor, Tensor], Tensor],
    noise: Tensor,
    num_steps: int,
) -> Tensor:
    """Integrate dx/dt = v(x, t) from t = 0 (noise) to t = 1 with ``num_steps`` Euler steps."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    x = noise
    B = noise.shape[0]
    dt = 1.0 / num_steps
    for k in range(num_steps):
        t = torch.full((B,), k * dt, device=noise.device, dtype=noise.dtype)
        x = x + dt * velocity_fn(x, t)
    return x
