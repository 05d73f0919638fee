"""Sampler steps against quality: python -m research.evaluation.steps.

Draws --per-class images of every class for each sampler, step count and precision, with the default
request's guidance (DEFAULT_GUIDANCE: CFG s = 2.5 where 0.25 < sigma <= 5, span-weighted) and the same seeds in
every row (class c uses seeds seed + c * per_class + i, as research.evaluate does). Scores them with research.evaluate's
classifier (the same cache) against the same reference statistics, next to a real baseline of as many
test images. Writes docs/steps.md and docs/steps.json.

  python -m research.evaluation.steps --per-class 24           # 4 samplers x 7 step counts, n = 240 each
  python -m research.evaluation.steps --samplers dpmpp_2m,ddim --steps 20 --precisions fp32,bf16 \\
      --per-class 64 --report docs/precision.md --json docs/precision.json

A precision other than fp32 runs the model's forward under autocast (app/models/fast.py); the latents and
the sampler stay fp32. The fewest steps whose FID is within --fid-tolerance of the same sampler's FID at
the most steps drawn is reported for each sampler and precision.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from app.engine.calibrate import model_calibrator
from app.models import CheckpointError, LoadedModel, load_checkpoint, unet_denoiser
from app.models.fast import PrecisionError, fast_denoiser, resolve_precision
from app.sampling import DEFAULT_GUIDANCE, SAMPLERS, Denoiser, SampleSpec
from research.data import DEFAULT_DATA_DIR, DatasetMissingError, load_fashion_mnist
from research.evaluation.classifier import add_classifier_arguments, get_classifier, score, uint8_to_model_images
from research.evaluation.metrics import accuracy
from research.evaluation.provenance import run_provenance
from research.evaluation.run import MAX_PER_CLASS, RealBaseline, real_baseline, score_scales
from research.generate import DEFAULT_MAX_ROWS, DEFAULT_MODEL, generate, positive_int, sweep_specs, total_steps

DEFAULT_SAMPLERS = tuple(sorted(SAMPLERS))
DEFAULT_STEPS = (5, 8, 10, 15, 20, 30, 50)
DEFAULT_PER_CLASS = 24


@dataclass
class StepsResult:
    sampler: str
    steps: int
    precision: str
    accuracy: float
    fid: float
    fid_vs_most: float  # FID / FID of the same sampler and precision at the most steps drawn
    diversity: float
    mean_pixel: float  # mean grey level, 0..255
    accuracy_per_class: list[float]


@dataclass
class FewestSteps:
    sampler: str
    precision: str
    steps: int | None  # None: no step count below the most is within the tolerance
    fid: float | None
    reference_steps: int
    reference_fid: float


@dataclass
class StepsTable:
    command: str
    date_utc: str
    machine: str
    git_commit: str
    checkpoint: str
    checkpoint_sha256: str
    checkpoint_steps: int | None
    class_names: list[str]
    guidance: str
    per_class: int
    seed: int
    fid_tolerance: float
    classifier_test_accuracy: float
    feature_dim: int
    reference_size: int
    real: RealBaseline
    results: list[StepsResult]
    fewest: list[FewestSteps]
    timings_s: dict[str, float] = field(default_factory=dict)


# ---- the run -------------------------------------------------------------------------------------------


def draw(
    model: LoadedModel,
    specs: Sequence[SampleSpec],
    precision: str,
    max_rows: int,
    on_step: Callable[[], None] | None = None,
) -> list[np.ndarray]:
    """As research.generate.generate, with the forward at the given precision: the images of each spec, in order."""
    return generate(model, specs, max_rows, on_step, forward=precision_forward(model, precision, max_rows))


def precision_forward(model: LoadedModel, precision: str, max_rows: int) -> Denoiser:
    """The model's forward at a precision, as the service builds it (app/models/fast.py): int8 calibrated on the
    model's own sampling and compiled over row buckets; another precision under autocast."""
    base = unet_denoiser(model.unet)
    calibrate = model_calibrator(model, base) if precision == "int8" else None
    return fast_denoiser(base, model.device, precision, max_rows=max_rows, calibrate=calibrate)


def fewest_steps(results: Sequence[StepsResult], tolerance: float) -> list[FewestSteps]:
    """For each sampler and precision: the fewest steps whose FID is at most (1 + tolerance) x the FID at
    the most steps drawn, the most steps themselves excluded."""
    out = []
    for key in dict.fromkeys((r.sampler, r.precision) for r in results):
        group = sorted((r for r in results if (r.sampler, r.precision) == key), key=lambda r: r.steps)
        most = group[-1]
        within = [r for r in group[:-1] if r.fid <= (1 + tolerance) * most.fid]
        first = within[0] if within else None
        out.append(
            FewestSteps(*key, first and first.steps, first and first.fid, most.steps, most.fid)  # type: ignore[arg-type]
        )
    return out


def run_steps(args: argparse.Namespace, model: LoadedModel, command: str) -> StepsTable:
    timings: dict[str, float] = {}
    started = time.monotonic()
    train_data = load_fashion_mnist("train", args.data_dir)
    test_images, test_labels = load_fashion_mnist("test", args.data_dir)
    classifier = get_classifier(args.classifier_cache, args.classifier_epochs, args.classifier_train_images, train_data)
    labels = test_labels.numpy()
    reference, real, test, reference_size = real_baseline(classifier, test_images, labels, args.per_class, args.seed)
    test_accuracy = accuracy(test.predictions, labels)
    print(f"classifier test accuracy: {test_accuracy:.4f}")
    timings["classifier"] = time.monotonic() - started

    classes = range(model.manifest.num_classes)
    g = DEFAULT_GUIDANCE
    keys = [(sampler, steps) for sampler in args.samplers for steps in args.steps]
    results: list[StepsResult] = []
    for precision in args.precisions:
        t0 = time.monotonic()
        specs = [
            spec
            for sampler, steps in keys
            for spec in sweep_specs(classes, [g.guidance_scale], args.seed, args.per_class, steps, sampler, g)
        ]
        total = total_steps(specs, args.max_rows)
        with tqdm(total=total, desc=f"sampling ({precision})", unit="step", dynamic_ncols=True) as bar:
            images = draw(model, specs, precision, args.max_rows, on_step=bar.update)
        timings[f"sampling {precision}"] = time.monotonic() - t0
        n = len(classes)
        for k, (sampler, steps) in enumerate(keys):
            scored = score(classifier, uint8_to_model_images(np.concatenate(images[k * n : (k + 1) * n])))
            (r,) = score_scales([scored], [g.guidance_scale], reference, n)
            results.append(
                StepsResult(
                    sampler, steps, precision, r.accuracy, r.fid, 0.0, r.diversity, r.mean_pixel, r.accuracy_per_class
                )  # fmt: skip
            )
    most = max(args.steps)
    for row in results:
        ref = next(x for x in results if (x.sampler, x.precision, x.steps) == (row.sampler, row.precision, most))
        row.fid_vs_most = row.fid / ref.fid
    timings["total"] = time.monotonic() - started
    return StepsTable(
        **run_provenance(command, args.model, model.manifest),
        guidance=f"DEFAULT_GUIDANCE: {json.dumps(g.to_dict())}",
        per_class=args.per_class,
        seed=args.seed,
        fid_tolerance=args.fid_tolerance,
        classifier_test_accuracy=test_accuracy,
        feature_dim=int(test.features.shape[1]),
        reference_size=reference_size,
        real=real,
        results=results,
        fewest=fewest_steps(results, args.fid_tolerance),
        timings_s=timings,
    )


# ---- the report ----------------------------------------------------------------------------------------


def pivot(table: StepsTable, precision: str, cell: Callable[[StepsResult], str]) -> list[str]:
    """A row per step count, a column per sampler."""
    samplers = list(dict.fromkeys(r.sampler for r in table.results))
    lines = ["| steps | " + " | ".join(samplers) + " |", "|---:|" + "---:|" * len(samplers)]
    for steps in sorted({r.steps for r in table.results}):
        by_sampler = {r.sampler: r for r in table.results if r.steps == steps and r.precision == precision}
        lines.append(f"| {steps} | " + " | ".join(cell(by_sampler[s]) for s in samplers) + " |")
    return lines


def precision_comparison(table: StepsTable) -> list[str]:
    """Each precision's accuracy and FID against fp32's at the same sampler, steps and seeds."""
    fp32 = {(r.sampler, r.steps): r for r in table.results if r.precision == "fp32"}
    lines = [
        "| sampler | steps | precision | accuracy | vs fp32 | FID | vs fp32 | diversity | mean grey |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in table.results:
        base = fp32[(r.sampler, r.steps)]
        lines.append(
            f"| {r.sampler} | {r.steps} | {r.precision} | {r.accuracy:.3f} | {r.accuracy - base.accuracy:+.3f} | "
            f"{r.fid:.2f} | {r.fid / base.fid:.3f}x | {r.diversity:.2f} | {r.mean_pixel:.1f} |"
        )
    return lines


def render_markdown(table: StepsTable) -> str:
    n = table.per_class * len(table.class_names)
    precisions = list(dict.fromkeys(r.precision for r in table.results))
    most = max(r.steps for r in table.results)
    sweep = len({r.steps for r in table.results}) > 1  # else a precision comparison at one step count
    lines = [
        "# Sampler steps against quality" if sweep else f"# Forward precisions against quality at {most} steps",
        "",
        "Written by `python -m research.evaluation.steps`; rerun it to refresh this page.",
        "",
        f"- command: `{table.command}`",
        f"- date: {table.date_utc}",
        f"- machine: {table.machine}",
        f"- git commit: `{table.git_commit}`",
        f"- checkpoint: `{table.checkpoint}`, weights sha256 `{table.checkpoint_sha256}`"
        + (f", {table.checkpoint_steps} training steps" if table.checkpoint_steps is not None else ""),
        f"- guidance: the default request's, {table.guidance}",
        f"- n = {n} images per cell ({table.per_class} per class), seeds {table.seed}.., the same seeds in every cell",
        f"- scoring classifier: research.evaluate's (small CNN trained on the train split), test accuracy "
        f"{table.classifier_test_accuracy:.4f}; FID in its {table.feature_dim}-d feature space to the "
        f"{table.reference_size} test images not in the real baseline",
        "- time: " + ", ".join(f"{k} {v:.0f} s" for k, v in table.timings_s.items()),
        "",
    ]
    for precision in precisions if sweep or len(precisions) == 1 else ():  # else the comparison says it all
        suffix = f" ({precision})" if len(precisions) > 1 else ""
        lines += [f"## FID{suffix}", "", *pivot(table, precision, lambda r: f"{r.fid:.2f}"), ""]
        if sweep:
            lines += [f"## FID / FID at {most} steps{suffix}", ""]
            lines += [*pivot(table, precision, lambda r: f"{r.fid_vs_most:.2f}"), ""]
        lines += [f"## Accuracy{suffix}", "", *pivot(table, precision, lambda r: f"{r.accuracy:.3f}"), ""]
    if len(precisions) > 1:
        lines += ["## Precisions at the same seeds", "", *precision_comparison(table), ""]
    real = table.real
    lines += [
        f"Real test images (n = {real.n}): accuracy {real.accuracy:.3f}, FID {real.fid:.2f} (the floor at this n), "
        f"diversity {real.diversity:.2f}, mean grey {real.mean_pixel:.1f}.",
        "",
    ]
    if not sweep:
        return "\n".join(lines)[:-1] + "\n"
    lines += [
        f"## Fewest steps within {table.fid_tolerance:.0%} of the FID at {most} steps",
        "",
        "| sampler | precision | fewest steps | FID there | FID at most steps |",
        "|---|---|---:|---:|---:|",
    ]
    for f in table.fewest:
        steps, fid = ("none", "–") if f.steps is None else (str(f.steps), f"{f.fid:.2f}")
        lines.append(f"| {f.sampler} | {f.precision} | {steps} | {fid} | {f.reference_fid:.2f} ({f.reference_steps}) |")
    return "\n".join(lines) + "\n"


# ---- command line --------------------------------------------------------------------------------------


def int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(sorted({positive_int(v.strip()) for v in text.split(",") if v.strip()}))
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"step counts: {exc}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected step counts, e.g. 5,10,20")
    return values


def name_list(choices: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
        unknown = [n for n in names if n not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"unknown name(s) {unknown}; choose from {', '.join(choices)}")
        return names

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m research.evaluation.steps",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="checkpoint folder (default: %(default)s)")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    p.add_argument("--samplers", type=name_list(sorted(SAMPLERS)), default=DEFAULT_SAMPLERS)
    p.add_argument("--steps", type=int_list, default=DEFAULT_STEPS, help="default 5,8,10,15,20,30,50")
    p.add_argument(
        "--precisions",
        type=name_list(("fp32", "bf16", "fp16", "int8")),
        default=("fp32",),
        help="the forward's precisions, compared with fp32 at the same seeds (fp16: CUDA only; int8: CPU, compiled)",
    )
    p.add_argument("--per-class", type=positive_int, default=DEFAULT_PER_CLASS, help="images per class and cell")
    p.add_argument("--seed", type=int, default=0, help="first sampling seed; also picks the real subset")
    p.add_argument("--fid-tolerance", type=float, default=0.10, help="for the fewest-steps line (default 0.10)")
    p.add_argument("--max-rows", type=positive_int, default=DEFAULT_MAX_ROWS, help="model rows per forward")
    add_classifier_arguments(p)
    p.add_argument("--report", type=Path, default=Path("docs/steps.md"))
    p.add_argument("--json", type=Path, default=Path("docs/steps.json"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = "python -m research.evaluation.steps " + shlex.join(sys.argv[1:] if argv is None else argv)
    if not 2 <= args.per_class <= MAX_PER_CLASS:
        parser.error(f"argument --per-class: must be between 2 and {MAX_PER_CLASS}, got {args.per_class}")
    if "fp32" not in args.precisions:
        args.precisions = ("fp32", *args.precisions)  # the other precisions are compared with it
    try:
        for precision in args.precisions:
            resolve_precision(precision, torch.device(args.device))
    except PrecisionError as exc:
        parser.error(f"argument --precisions: {exc}")
    try:
        model = load_checkpoint(args.model, args.device)
        table = run_steps(args, model, command.strip())
    except (CheckpointError, DatasetMissingError) as exc:
        sys.exit(f"error: {exc}")
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(render_markdown(table))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(asdict(table), indent=2) + "\n")
    for f in table.fewest if len(args.steps) > 1 else ():
        print(f"{f.sampler} ({f.precision}): fewest steps within {args.fid_tolerance:.0%} of {f.reference_steps} "
              f"steps' FID {f.reference_fid:.2f}: {f.steps}")  # fmt: skip
    print(f"wrote {args.report}, {args.json}")


if __name__ == "__main__":
    main()
