"""Measure the guidance trade-off of a checkpoint: python -m research.evaluate.

For each guidance scale it draws --per-class images of every class (fixed seeds, the same seeds at
every scale) and scores them with a small CNN Fashion-MNIST classifier trained here once and cached:

  accuracy   the classifier's accuracy on the requested class (fidelity)
  FID        Frechet distance in the classifier's penultimate feature space to the test split
  diversity  mean pairwise feature distance within each class, averaged over the classes

The same metrics on n real test images, n being the generated count per scale, give the baseline:
a class-balanced subset of the test split held out from the reference statistics.
Writes docs/quality.md, docs/quality.json, docs/img/tradeoff.png and docs/img/sweep.png.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

from app.models import CheckpointError, load_checkpoint
from app.sampling import DEFAULT_SAMPLER, SAMPLERS
from research.data import DEFAULT_DATA_DIR, DatasetMissingError
from research.evaluation.classifier import add_classifier_arguments
from research.evaluation.report import print_summary, write_outputs
from research.evaluation.run import DEFAULT_PER_CLASS, MAX_PER_CLASS, run_evaluation
from research.generate import DEFAULT_MAX_ROWS, DEFAULT_MODEL, DEFAULT_SCALES, positive_int, scale_list


def sampler_list(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in SAMPLERS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown sampler(s) {unknown}; choose from {', '.join(sorted(SAMPLERS))}")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cfg-evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="checkpoint folder (default: %(default)s)")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    p.add_argument("--scales", type=scale_list, default=DEFAULT_SCALES, help="default 0,1,2,3,5,7.5")
    p.add_argument("--per-class", type=positive_int, default=DEFAULT_PER_CLASS, help="images per class and scale")
    p.add_argument("--steps", type=positive_int, default=20)
    p.add_argument("--sampler", choices=sorted(SAMPLERS), default=DEFAULT_SAMPLER)
    p.add_argument("--seed", type=int, default=0, help="first sampling seed; also picks the real subset")
    p.add_argument(
        "--compare-samplers",
        type=sampler_list,
        default=(),
        help="also score these samplers at --compare-scales, e.g. ddim,dpmpp_2m,euler_a",
    )
    p.add_argument("--compare-scales", type=scale_list, default=(1.0, 3.0), help="default 1,3")
    p.add_argument("--max-rows", type=positive_int, default=DEFAULT_MAX_ROWS, help="model rows per forward")
    add_classifier_arguments(p)
    p.add_argument("--report", type=Path, default=Path("docs/quality.md"))
    p.add_argument("--json", type=Path, default=Path("docs/quality.json"))
    p.add_argument("--img-dir", type=Path, default=Path("docs/img"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = "python -m research.evaluate " + shlex.join(sys.argv[1:] if argv is None else argv)
    if args.compare_samplers and not set(args.compare_scales) <= set(args.scales):
        parser.error("argument --compare-scales: every scale must also be in --scales")
    if not 2 <= args.per_class <= MAX_PER_CLASS:
        # The real baseline takes per_class test images of each class (1000 each) from the reference.
        parser.error(f"argument --per-class: must be between 2 and {MAX_PER_CLASS}, got {args.per_class}")
    try:
        model = load_checkpoint(args.model, args.device)
        ev, images = run_evaluation(args, model, command.strip())
    except (CheckpointError, DatasetMissingError) as exc:
        sys.exit(f"error: {exc}")
    write_outputs(args, ev, images)
    print_summary(ev)
    print(f"wrote {args.report}, {args.json}, {args.img_dir / 'tradeoff.png'}, {args.img_dir / 'sweep.png'}")


if __name__ == "__main__":
    main()
