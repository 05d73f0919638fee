"""How much an interval schedule guides, per sampler and step count: python -m research.evaluation.dose.

The guidance a schedule adds over a request is D = sum over steps of (s_i - 1) (sigma_i - sigma_(i+1))
(sigma_N = 0): a step moves x by about eps * (sigma_(i+1) - sigma_i), and guidance adds (s_i - 1) times the
conditional-minus-unconditional difference to eps. For an interval (sigma_min, sigma_max] at scale s the
interval itself asks for (s - 1) (sigma_max - sigma_min). Weighting "step" gives the whole scale to each step
whose sigma lies inside, so D depends on which steps land there; weighting "span" gives each step the share of
its noise span inside the interval, so D is the interval's own at every step count and sampler that covers it.
No model is run: the sigmas come from the checkpoint's scheduler config and each sampler's timesteps.

  python -m research.evaluation.dose                      # the default request's interval, 10-50 steps
  python -m research.evaluation.dose --scale 3 --sigma-min 0.25 --sigma-max 5 --steps 10,20,50
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from app.config import DEFAULT_MODEL_PATH
from app.guidance import INTERVAL_WEIGHTINGS, GuidanceSchedule, guidance_scales
from app.sampling import DEFAULT_GUIDANCE, SAMPLERS
from app.sampling.schedulers import config_key, schedule_values


@dataclass(frozen=True)
class Dose:
    guided_steps: int  # steps whose scale is not 1 (they run the unconditional rows)
    amount: float  # sum of (s_i - 1) (sigma_i - sigma_(i+1))


def dose(schedule: GuidanceSchedule, scale: float, sampler: str, scheduler_config: dict, steps: int) -> Dose:
    """The guidance `schedule` at `scale` adds over `steps` steps of `sampler`, as the engine computes its scales."""
    _, sigmas = schedule_values(sampler, config_key(scheduler_config), steps)
    scales = guidance_scales(schedule, scale, steps, sigmas)
    ends = (*sigmas[1:], 0.0)
    amount = sum((s - 1.0) * (hi - lo) for s, hi, lo in zip(scales, sigmas, ends, strict=True))
    return Dose(sum(s != 1.0 for s in scales), amount)


def table(
    schedule: GuidanceSchedule, scale: float, scheduler_config: dict, samplers: Sequence[str], steps: Sequence[int]
) -> str:
    """A markdown table: per sampler, each weighting's guided steps and amount at each step count."""
    head = "| sampler | weighting | " + " | ".join(f"{n} steps" for n in steps) + " |"
    lines = [head, "|---|---|" + "---:|" * len(steps)]
    for sampler in samplers:
        for weighting in INTERVAL_WEIGHTINGS:
            weighted = replace(schedule, weighting=weighting)
            cells = [dose(weighted, scale, sampler, scheduler_config, n) for n in steps]
            lines.append(
                f"| {sampler} | {weighting} | " + " | ".join(f"{c.amount:.3f} ({c.guided_steps})" for c in cells) + " |"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    default = DEFAULT_GUIDANCE.schedule
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_MODEL_PATH, help="its scheduler config gives the sigmas")
    p.add_argument("--scale", type=float, default=DEFAULT_GUIDANCE.guidance_scale)
    p.add_argument("--sigma-min", type=float, default=default.sigma_min)
    p.add_argument("--sigma-max", type=float, default=default.sigma_max)
    p.add_argument("--samplers", default=",".join(SAMPLERS))
    p.add_argument("--steps", default="10,15,20,30,50")
    args = p.parse_args(argv)
    config = json.loads((args.checkpoint / "scheduler" / "scheduler_config.json").read_text())
    schedule = GuidanceSchedule("interval", 0.0, 1.0, sigma_min=args.sigma_min, sigma_max=args.sigma_max)
    samplers = [s for s in args.samplers.split(",") if s]
    unknown = [s for s in samplers if s not in SAMPLERS]
    if unknown:
        p.error(f"unknown sampler(s) {', '.join(unknown)}; choose from {', '.join(SAMPLERS)}")
    steps = [int(n) for n in args.steps.split(",") if n]
    print(table(schedule, args.scale, config, samplers, steps))
    low = args.sigma_min or 0.0
    print(
        f"\nThe interval's own amount, (s - 1)(sigma_max - sigma_min): {(args.scale - 1) * (args.sigma_max - low):.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
