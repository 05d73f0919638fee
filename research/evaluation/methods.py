"""The guidance-methods table: python -m research.evaluation.methods.

Draws --per-class images of every class with each guidance setting and sampler (the settings are in
research/evaluation/settings.py), at the same seeds in every row: class c uses seeds seed + c * per_class + i,
as research.evaluate does. Scores them with research.evaluate's classifier (the same cache) against the same
reference statistics, next to the same real baseline (n = 10 * per_class real test images).
Writes docs/guidance.md, docs/guidance.json and docs/img/guidance-grid.png (a row per setting and
sampler, the first image of each class).

  python -m research.evaluation.methods                       # the whole table: 27 rows, 2600 forwards of 128 rows,
                                                         # about an hour on 2 CPU cores
  python -m research.evaluation.methods --list                # the settings' names and their JSON
  python -m research.evaluation.methods --only "cfg s=3,apg s=5" --samplers dpmpp_2m --per-class 8
  python -m research.evaluation.methods --only "cfg s=3" \\
      --extra '{"name": "apg s=5 r=1", "guidance_scale": 5, "method": {"kind": "apg", "norm_threshold": 1.0}}'

Each sampler's CFG s=1 row is always drawn: FID and diversity are also given relative to it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from app.images import labelled_grid
from app.models import CheckpointError, LoadedModel, load_checkpoint
from app.sampling import SAMPLERS
from research.data import DEFAULT_DATA_DIR, DatasetMissingError, load_fashion_mnist
from research.evaluation.classifier import (
    FashionClassifier,
    add_classifier_arguments,
    get_classifier,
    score,
    uint8_to_model_images,
)
from research.evaluation.metrics import GaussianStats, accuracy
from research.evaluation.provenance import run_provenance
from research.evaluation.run import MAX_PER_CLASS, RealBaseline, real_baseline, score_scales
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
from research.generate import DEFAULT_MAX_ROWS, DEFAULT_MODEL, generate, positive_int, sweep_specs, total_steps

DEFAULT_PER_CLASS = 32
DEFAULT_SAMPLERS = ("dpmpp_2m", "ddim")


@dataclass
class MethodResult:
    name: str
    sampler: str
    setting: dict  # the setting's JSON form: what --extra takes to draw it again
    accuracy: float
    fid: float
    fid_vs_s1: float  # FID / FID of this sampler's CFG s=1 row
    diversity: float
    diversity_vs_s1: float
    mean_pixel: float  # mean grey level, 0..255
    accuracy_per_class: list[float]


@dataclass
class MethodsTable:
    command: str
    date_utc: str
    machine: str
    git_commit: str
    checkpoint: str
    checkpoint_sha256: str
    checkpoint_steps: int | None
    class_names: list[str]
    steps: int
    per_class: int
    seed: int
    classifier_test_accuracy: float
    feature_dim: int
    reference_size: int
    real: RealBaseline
    results: list[MethodResult]
    timings_s: dict[str, float] = field(default_factory=dict)


# ---- the run -------------------------------------------------------------------------------------------


def draw_rows(
    model: LoadedModel, rows: Sequence[Row], per_class: int, steps: int, seed: int, max_rows: int
) -> list[np.ndarray]:
    """The images of each row, uint8 (num_classes * per_class, H, W, C), class-major; every row uses the
    same seeds. All rows go to one generate() call, so rows of any setting and sampler share forwards."""
    classes = range(model.manifest.num_classes)
    specs = []
    for row in rows:
        g = row.setting.guidance
        specs += sweep_specs(classes, [g.guidance_scale], seed, per_class, steps, row.sampler, g)
    with tqdm(total=total_steps(specs, max_rows), desc="sampling", unit="step", dynamic_ncols=True) as bar:
        images = generate(model, specs, max_rows, on_step=bar.update)
    n = len(classes)
    return [np.concatenate(images[r * n : (r + 1) * n]) for r in range(len(rows))]


def score_rows(
    rows: Sequence[Row],
    images: Sequence[np.ndarray],
    classifier: FashionClassifier,
    reference: GaussianStats,
    num_classes: int,
) -> list[MethodResult]:
    """The metrics of each row, and its FID and diversity over those of its sampler's CFG s=1 row."""
    results = []
    for row, row_images in zip(rows, images, strict=True):
        scored = score(classifier, uint8_to_model_images(row_images))
        (r,) = score_scales([scored], [row.setting.guidance.guidance_scale], reference, num_classes)
        results.append((row, r))
    s1 = {row.sampler: r for row, r in results if row.setting.name == REFERENCE_NAME}
    return [
        MethodResult(
            name=row.setting.name,
            sampler=row.sampler,
            setting=setting_to_dict(row.setting),
            accuracy=r.accuracy,
            fid=r.fid,
            fid_vs_s1=r.fid / s1[row.sampler].fid,
            diversity=r.diversity,
            diversity_vs_s1=r.diversity / s1[row.sampler].diversity,
            mean_pixel=r.mean_pixel,
            accuracy_per_class=r.accuracy_per_class,
        )
        for row, r in results
    ]


def run_methods(
    args: argparse.Namespace, model: LoadedModel, rows: Sequence[Row], command: str
) -> tuple[MethodsTable, list[np.ndarray]]:
    """Train or load the classifier, score the real baseline, then draw and score every row."""
    timings: dict[str, float] = {}
    started = time.monotonic()
    train_data = load_fashion_mnist("train", args.data_dir)
    test_images, test_labels = load_fashion_mnist("test", args.data_dir)
    classifier = get_classifier(args.classifier_cache, args.classifier_epochs, args.classifier_train_images, train_data)
    timings["classifier"] = time.monotonic() - started
    labels = test_labels.numpy()
    reference, real, test, reference_size = real_baseline(classifier, test_images, labels, args.per_class, args.seed)
    test_accuracy = accuracy(test.predictions, labels)
    print(f"classifier test accuracy: {test_accuracy:.4f}")

    t0 = time.monotonic()
    images = draw_rows(model, rows, args.per_class, args.steps, args.seed, args.max_rows)
    timings["sampling"] = time.monotonic() - t0
    t0 = time.monotonic()
    results = score_rows(rows, images, classifier, reference, model.manifest.num_classes)
    timings["scoring"] = time.monotonic() - t0
    timings["total"] = time.monotonic() - started
    table = MethodsTable(
        **run_provenance(command, args.model, model.manifest),
        steps=args.steps,
        per_class=args.per_class,
        seed=args.seed,
        classifier_test_accuracy=test_accuracy,
        feature_dim=int(test.features.shape[1]),
        reference_size=reference_size,
        real=real,
        results=results,
        timings_s=timings,
    )
    return table, images


# ---- the report ----------------------------------------------------------------------------------------


def methods_grid(images: Sequence[np.ndarray], rows: Sequence[Row], class_names: Sequence[str]) -> Image.Image:
    """A row per table row, labelled with its setting and sampler; a column per class (its first seed)."""
    per_class = images[0].shape[0] // len(class_names)
    cells = np.stack([row_images[c * per_class] for row_images in images for c in range(len(class_names))])
    col_labels = [name.split("/")[0] for name in class_names]
    return labelled_grid(cells, len(class_names), [row.label for row in rows], col_labels, zoom=3, font_size=13)


def render_markdown(table: MethodsTable, grid_png: str) -> str:
    n = table.per_class * len(table.class_names)
    real = table.real
    lines = [
        "# Guidance methods at the same seeds",
        "",
        "Written by `python -m research.evaluation.methods`; rerun it to refresh this page.",
        "",
        f"- command: `{table.command}`",
        f"- date: {table.date_utc}",
        f"- machine: {table.machine}",
        f"- git commit: `{table.git_commit}`",
        f"- checkpoint: `{table.checkpoint}`, weights sha256 `{table.checkpoint_sha256}`"
        + (f", {table.checkpoint_steps} training steps" if table.checkpoint_steps is not None else ""),
        f"- sampling: {table.steps} steps, {table.per_class} images per class (n = {n} per setting), "
        f"seeds {table.seed}.., the same seeds in every row",
        f"- scoring classifier: research.evaluate's (small CNN trained on the train split), test accuracy "
        f"{table.classifier_test_accuracy:.4f}",
        "- time: " + ", ".join(f"{k} {v:.0f} s" for k, v in table.timings_s.items()),
        "",
        "| setting | sampler | accuracy | FID | FID / s=1 | diversity | diversity / s=1 | mean grey |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in table.results:
        lines.append(
            f"| `{r.name}` | {r.sampler} | {r.accuracy:.3f} | {r.fid:.2f} | {r.fid_vs_s1:.2f} | "
            f"{r.diversity:.2f} | {r.diversity_vs_s1:.2f} | {r.mean_pixel:.1f} |"
        )
    lines += [
        f"| real test images (n = {real.n}) | – | {real.accuracy:.3f} | {real.fid:.2f} | – | "
        f"{real.diversity:.2f} | – | {real.mean_pixel:.1f} |",
        "",
        "- **accuracy**: the classifier's accuracy on the requested class.",
        f"- **FID**: Frechet distance in the classifier's {table.feature_dim}-d feature space to the "
        f"{table.reference_size} test images not in the real row (as in docs/quality.md); the real row is "
        "the floor at this n. **FID / s=1**: over the FID of the same sampler's `cfg s=1` row.",
        "- **diversity**: mean pairwise feature distance within each class, averaged over the classes; "
        "**/ s=1** as for FID.",
        "- **mean grey**: the mean grey level (0..255) of the n images.",
        "",
        "## Settings",
        "",
        "Each setting as `--extra` takes it (fields left out have the defaults of `app/guidance/` and "
        "`app/sampling/run.py`):",
        "",
        "| setting | JSON |",
        "|---|---|",
    ]
    seen = set()
    for r in table.results:
        if r.name not in seen:
            seen.add(r.name)
            lines.append(f"| `{r.name}` | `{json.dumps(r.setting)}` |")
    lines += [
        "",
        "## Samples",
        "",
        "Rows: settings (sampler in brackets); columns: classes, the first seed of each. Every row has the same seeds.",
        "",
        f"![one image per class for each guidance setting]({grid_png})",
        "",
    ]
    return "\n".join(lines)


def write_outputs(args: argparse.Namespace, table: MethodsTable, rows: Sequence[Row], images: list) -> None:
    args.grid.parent.mkdir(parents=True, exist_ok=True)
    methods_grid(images, rows, table.class_names).save(args.grid, format="PNG")
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(render_markdown(table, os.path.relpath(args.grid, args.report.parent)))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(asdict(table), indent=2) + "\n")


def print_summary(table: MethodsTable) -> None:
    width = max(len(r.name) for r in table.results)
    print(f"{'setting':<{width}} {'sampler':>9} {'accuracy':>9} {'FID':>8} {'/s=1':>6} {'diversity':>10} {'pixel':>6}")
    for r in table.results:
        print(
            f"{r.name:<{width}} {r.sampler:>9} {r.accuracy:>9.3f} {r.fid:>8.2f} {r.fid_vs_s1:>6.2f} "
            f"{r.diversity:>10.2f} {r.mean_pixel:>6.1f}"
        )
    real = table.real
    print(f"{'real':<{width}} {'':>9} {real.accuracy:>9.3f} {real.fid:>8.2f} {'':>6} {real.diversity:>10.2f} "
          f"{real.mean_pixel:>6.1f}  (n = {real.n})")  # fmt: skip


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
    add_classifier_arguments(p)
    p.add_argument("--report", type=Path, default=Path("docs/guidance.md"))
    p.add_argument("--json", type=Path, default=Path("docs/guidance.json"))
    p.add_argument(
        "--grid",
        type=Path,
        default=None,
        help="the image grid (default: img/<report's name>-grid.png beside --report, docs/img/guidance-grid.png "
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
        table, images = run_methods(args, model, rows, command.strip())
    except (CheckpointError, DatasetMissingError) as exc:
        sys.exit(f"error: {exc}")
    write_outputs(args, table, rows, images)
    print_summary(table)
    print(f"wrote {args.report}, {args.json}, {args.grid}")


if __name__ == "__main__":
    main()
