"""The event loop's and the engine's own cost per request, on the CPU, without the model:

  - the step loop beside the forward, per sampler: a tick of N one-image requests with a zero-cost stand-in
    forward (eps = 0, a stand-in by design: it isolates the model input, the guidance combine and the
    sampler step), each request stepped by its own diffusers scheduler against app.sampling.batched's step
    over all of them (bench_gpu.py's step loop times the same on a card with the real forward);
  - building a request's SampleRun, which the event loop's thread does for every request.

    python3 bench/bench_step.py                     # 64 requests, on this machine's CPU
    python3 bench/bench_step.py --requests 16 --record

prints the markdown table (with machine, commit and command); --record appends it to docs/benchmarks/history.md.
"""

from __future__ import annotations

import argparse
import sys
import timeit
import types
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.config import DEFAULT_MODEL_PATH  # noqa: E402
from app.models import load_checkpoint  # noqa: E402
from app.sampling import DEFAULT_GUIDANCE, SAMPLERS, SampleRun, SampleSpec  # noqa: E402
from bench.gpu_sections import step_breakdown  # noqa: E402
from bench.record import publish  # noqa: E402
from research.evaluation.provenance import git_commit, machine_description  # noqa: E402


def build_times(loaded, rounds: int = 5, number: int = 1000) -> list[str]:
    """What building one request's SampleRun costs (the event loop's thread does it for every request), per
    sampler at the default guidance and one image: the best of rounds x number constructions."""
    m = loaded.manifest
    lines = ["Building a one-image request's SampleRun, default guidance (us, best of 5 x 1000):", ""]
    lines += ["| sampler | stepped together | on its own scheduler |", "|---|---:|---:|"]
    for sampler in SAMPLERS:
        spec = SampleSpec(class_label=3, seeds=(1,), sampler=sampler, guidance=DEFAULT_GUIDANCE)
        cells = []
        for together in (True, False):

            def build(together=together, spec=spec) -> SampleRun:
                return SampleRun(spec, loaded.scheduler_config, m.sample_shape, m.null_label, together=together)

            build()
            best = min(timeit.timeit(build, number=number) for _ in range(rounds)) / number
            cells.append(f"{best * 1e6:.0f}")
        lines.append(f"| {sampler} | {cells[0]} | {cells[1]} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the engine's thread runs the step)")
    p.add_argument("--record", action="store_true", help="append the result to docs/benchmarks/history.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_checkpoint(DEFAULT_MODEL_PATH, "cpu")
    report = types.SimpleNamespace(data={})

    def stand_in(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)

    table = step_breakdown(loaded, {"stand-in (eps = 0)": stand_in}, torch.device("cpu"), report, n=args.requests)
    table += ["", *build_times(loaded)]
    publish(
        [
            f"## Step loop beside the forward, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, commit {git_commit()}",
            "",
            f"- machine: {machine_description()}",
            f"- command: `python3 {' '.join(sys.argv)}`",
            "",
            *table,
        ],
        args.record,
    )


if __name__ == "__main__":
    main()
