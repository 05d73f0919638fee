"""The guidance-methods table: python -m research.evaluation.methods.

Draws --per-class images of every class with each guidance setting and sampler (the settings are in
research/evaluation/settings.py), at the same seeds in every row: class c uses seeds seed + c * per_class + i,
as research.evaluate does. Scores them under both judges (research/evaluation/judges: research.evaluate's
small CNN, the same cache, and the committed ResNet), each against its own reference statistics of the
test split, next to the same real baseline (n = 10 * per_class real test images).
Writes docs/guidance-table.md, docs/guidance-table.json and docs/img/guidance-table-grid.png (a row per setting and
sampler, the first image of each class).

  python -m research.evaluation.methods                       # the whole table: 27 rows, 2600 forwards of 128 rows,
                                                         # about an hour on 2 CPU cores
  python -m research.evaluation.methods --list                # the settings' names and their JSON
  python -m research.evaluation.methods --only "cfg s=3,apg s=5" --samplers dpmpp_2m --per-class 8
  python -m research.evaluation.methods --only "cfg s=3" \\
      --extra '{"name": "apg s=5 r=1", "guidance_scale": 5, "method": {"kind": "apg", "norm_threshold": 1.0}}'

Each sampler's CFG s=1 row is always drawn: FID and diversity are also given relative to it.
The report is written by research/evaluation/methods_report.py.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from app.models import CheckpointError, LoadedModel, load_checkpoint
from app.models.fast import PrecisionError, resolve_precision
from app.sampling import SAMPLERS, Denoiser
from research.data import DEFAULT_DATA_DIR, DatasetMissingError, load_fashion_mnist
from research.evaluation.classifier import add_classifier_arguments, score, uint8_to_model_images
from research.evaluation.judges import load_judges
from research.evaluation.judges.resnet import JudgeLoadError
from research.evaluation.judges.scoring import (
    JudgeReference,
    judge_real_subset,
    judge_reference,
    judge_set,
    real_split,
)
from research.evaluation.methods_report import print_summary, write_outputs
from research.evaluation.methods_table import JudgeSummary, MethodResult, MethodScores, MethodsTable, RealRow
from research.evaluation.metrics import mean_grey
from research.evaluation.provenance import run_provenance
from research.evaluation.run import MAX_PER_CLASS
from research.evaluation.settings import (
    REFERENCE_NAME,
    GuidanceSetting,
    Row,
    SettingError,
    choose_settings,
    default_settings,
    parse_setting,
    setting_to_dict,
    table_rows,
)
from research.evaluation.steps import precision_forward
from research.generate import (
    DEFAULT_MAX_ROWS,
    DEFAULT_MODEL,
    add_guide_argument,
    generate,
    load_guides,
    positive_int,
    sweep_specs,
    total_steps,
)

DEFAULT_PER_CLASS = 32
DEFAULT_SAMPLERS = ("dpmpp_2m", "ddim")


# ---- the run -------------------------------------------------------------------------------------------


def draw_rows(
    model: LoadedModel,
    rows: Sequence[Row],
    per_class: int,
    steps: int,
    seed: int,
    max_rows: int,
    guides: Mapping[str, Denoiser] | None = None,
    forward: Denoiser | None = None,
) -> list[np.ndarray]:
    """The images of each row, uint8 (num_classes * per_class, H, W, C), class-major; every row uses the
    same seeds. All rows go to one generate() call, so rows of any setting and sampler share forwards. forward:
    the model's forward at another precision (precision_forward), else its own fp32 one."""
    classes = range(model.manifest.num_classes)
    specs = []
    for row in rows:
        g = row.setting.guidance
        row_specs = sweep_specs(classes, [g.guidance_scale], seed, per_class, steps, row.sampler, g)
        specs += [replace(spec, cache=row.setting.cache) for spec in row_specs]
    with tqdm(total=total_steps(specs, max_rows), desc="sampling", unit="step", dynamic_ncols=True) as bar:
        images = generate(model, specs, max_rows, on_step=bar.update, forward=forward, guides=guides)
    n = len(classes)
    return [np.concatenate(images[r * n : (r + 1) * n]) for r in range(len(rows))]


def score_rows(
    rows: Sequence[Row], images: Sequence[np.ndarray], references: Sequence[JudgeReference]
) -> list[MethodResult]:
    """The metrics of each row under each judge, with FID and diversity over its sampler's CFG s=1 row's."""
    scored = []
    for row, row_images in zip(rows, images, strict=True):
        model_images = uint8_to_model_images(row_images)
        requested = np.repeat(np.arange(references[0].num_classes), row_images.shape[0] // references[0].num_classes)
        judged = {ref.judge.name: judge_set(ref, score(ref.judge.model, model_images), requested) for ref in references}
        scored.append((row, mean_grey(model_images), judged))
    s1 = {row.sampler: judged for row, _, judged in scored if row.setting.name == REFERENCE_NAME}
    return [
        MethodResult(
            name=row.setting.name,
            sampler=row.sampler,
            setting=setting_to_dict(row.setting),
            mean_pixel=pixel,
            judges={
                name: MethodScores(
                    **asdict(m),
                    fid_vs_s1=m.fid / s1[row.sampler][name].fid,
                    diversity_vs_s1=m.diversity / s1[row.sampler][name].diversity,
                )
                for name, m in judged.items()
            },
        )
        for row, pixel, judged in scored
    ]


def run_methods(
    args: argparse.Namespace,
    model: LoadedModel,
    rows: Sequence[Row],
    command: str,
    guides: Mapping[str, Denoiser] | None = None,
) -> tuple[MethodsTable, list[np.ndarray]]:
    """Load (or train) the judges, score the real baseline under each, then draw and score every row (guides:
    the guide models of its autoguidance rows, by name)."""
    timings: dict[str, float] = {}
    started = time.monotonic()
    train_data = load_fashion_mnist("train", args.data_dir)
    test_images, test_labels = load_fashion_mnist("test", args.data_dir)
    judges = load_judges(args, train_data)
    timings["judges"] = time.monotonic() - started
    labels = test_labels.numpy()
    split = real_split(labels, args.per_class, args.seed)
    references = [judge_reference(j, test_images, labels, split) for j in judges]
    for ref in references:
        print(f"{ref.judge.title} test accuracy: {ref.test_accuracy:.4f}")
    real = RealRow(
        n=int(split.subset.size),
        mean_pixel=mean_grey(test_images[split.subset]),
        judges={ref.judge.name: judge_real_subset(ref, labels, split) for ref in references},
    )

    t0 = time.monotonic()
    forward = None if args.precision == "fp32" else precision_forward(model, args.precision, args.max_rows)
    images = draw_rows(model, rows, args.per_class, args.steps, args.seed, args.max_rows, guides, forward)
    timings["sampling"] = time.monotonic() - t0  # with int8, its calibration and compilation
    t0 = time.monotonic()
    results = score_rows(rows, images, references)
    timings["scoring"] = time.monotonic() - t0
    timings["total"] = time.monotonic() - started
    table = MethodsTable(
        **run_provenance(command, args.model, model.manifest),
        steps=args.steps,
        per_class=args.per_class,
        seed=args.seed,
        precision=args.precision,
        judges={
            ref.judge.name: JudgeSummary(
                ref.judge.title, ref.judge.source, ref.test_accuracy, int(ref.test.features.shape[1])
            )
            for ref in references
        },
        reference_size=int(split.rest.size),
        manifold_reference_size=int(split.manifold.size),
        real=real,
        results=results,
        timings_s=timings,
    )
    return table, images


# ---- command line --------------------------------------------------------------------------------------


def name_list(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def sampler_names(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(name_list(text)))
    unknown = [n for n in names if n not in SAMPLERS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown sampler(s) {unknown}; choose from {', '.join(sorted(SAMPLERS))}")
    return names


def extra_setting(text: str) -> GuidanceSetting:
    try:
        return parse_setting(text)
    except SettingError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m research.evaluation.methods",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="checkpoint folder (default: %(default)s)")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    p.add_argument("--per-class", type=positive_int, default=DEFAULT_PER_CLASS, help="images per class and row")
    p.add_argument("--steps", type=positive_int, default=20)
    p.add_argument("--seed", type=int, default=0, help="first sampling seed; also picks the real subset")
    p.add_argument(
        "--samplers",
        type=sampler_names,
        default=DEFAULT_SAMPLERS,
        help="the samplers to draw with, in this order (default dpmpp_2m,ddim); a setting that lists samplers "
        "is drawn with those of them only",
    )
    p.add_argument("--only", type=name_list, default=None, help="comma-separated default settings (see --list)")
    p.add_argument("--extra", type=extra_setting, action="append", default=[], help="a setting as JSON; repeatable")
    p.add_argument("--list", action="store_true", help="print the settings that would be drawn, and exit")
    p.add_argument("--max-rows", type=positive_int, default=DEFAULT_MAX_ROWS, help="model rows per forward")
    p.add_argument(
        "--precision",
        choices=("fp32", "bf16", "fp16", "int8"),
        default="fp32",
        help="the model's forward, as the service's CFG_PRECISION builds it (int8: a CPU with VNNI, calibrated and "
        "compiled; fp16: CUDA only); guide models stay fp32",
    )
    add_guide_argument(p)
    add_classifier_arguments(p)
    p.add_argument("--report", type=Path, default=Path("docs/guidance-table.md"))
    p.add_argument("--title", default="Guidance methods at the same seeds", help="the report's heading")
    p.add_argument("--json", type=Path, default=Path("docs/guidance-table.json"))
    p.add_argument(
        "--grid",
        type=Path,
        default=None,
        help="the image grid (default: img/<report's name>-grid.png beside --report, docs/img/guidance-table-grid.png "
        "for the default report)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = "python -m research.evaluation.methods " + shlex.join(sys.argv[1:] if argv is None else argv)
    if args.grid is None:  # beside the report, so that a report written elsewhere leaves docs/img alone
        args.grid = args.report.parent / "img" / f"{args.report.stem}-grid.png"
    if not 2 <= args.per_class <= MAX_PER_CLASS:
        # Diversity needs two images of a class; the real baseline takes per_class test images of each class.
        parser.error(f"argument --per-class: must be between 2 and {MAX_PER_CLASS}, got {args.per_class}")
    try:
        resolve_precision(args.precision, torch.device(args.device))
    except PrecisionError as exc:
        parser.error(f"argument --precision: {exc}")
    try:
        rows = table_rows(choose_settings(args.only, args.extra), args.samplers)
    except SettingError as exc:
        parser.error(str(exc))
    if not rows:
        parser.error(f"no setting is drawn with {', '.join(args.samplers)}; add it to a setting's samplers")
    if args.list:
        for row in rows:
            print(f"{row.sampler:>9}  {json.dumps(setting_to_dict(row.setting))}")
        return
    print(f"{len(rows)} rows (of {len(default_settings())} default settings), {args.per_class} images per class each")
    try:
        model = load_checkpoint(args.model, args.device)
        guides = load_guides(model, args.guide)  # ValueError: a guide of another task
    except (CheckpointError, ValueError) as exc:
        sys.exit(f"error: {exc}")
    named = {getattr(row.setting.guidance.method, "guide", None) for row in rows}
    missing = {str(g) for g in named if g is not None and g not in guides}
    if missing:
        parser.error(f"settings name guides that are not loaded: {', '.join(sorted(missing))}; add --guide FOLDER")
    try:
        table, images = run_methods(args, model, rows, command.strip(), guides)
    except (CheckpointError, DatasetMissingError, JudgeLoadError) as exc:
        sys.exit(f"error: {exc}")
    write_outputs(args, table, rows, images)
    print_summary(table)
    print(f"wrote {args.report}, {args.json}, {args.grid}")


if __name__ == "__main__":
    main()
