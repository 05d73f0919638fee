"""The two judges on images whose flaws are known: python -m research.evaluation.judges.check.

Takes n = 10 * --per-class real test images (class-balanced, the real row of the other reports), spoils
them on purpose (degrade.py: brighter, blurred, two classes in one) and scores every set under both
judges; then draws a few guidance settings through the real sampler at the same n and scores those too.
Writes docs/judges-check.md, docs/judges-check.json and docs/img/judges-degraded.png; docs/judges.md
reads them.

  nice -n 10 python -m research.evaluation.judges.check               # n = 200, about 5 minutes on 2 CPU cores
  python -m research.evaluation.judges.check --per-class 2 --steps 2 --report /tmp/j.md --json /tmp/j.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from app.images import labelled_grid
from app.models import CheckpointError, load_checkpoint
from app.sampling import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, SAMPLERS
from research.data import CLASS_NAMES, DEFAULT_DATA_DIR, DatasetMissingError, load_fashion_mnist
from research.evaluation.classifier import Scored, add_classifier_arguments, score, uint8_to_model_images
from research.evaluation.judges import load_judges
from research.evaluation.judges.degrade import degradations, facing_as_class_mean
from research.evaluation.judges.resnet import JudgeLoadError
from research.evaluation.judges.scoring import JudgedMetrics, judge_reference, judge_set, real_split
from research.evaluation.methods import draw_rows
from research.evaluation.methods_table import JudgeSummary
from research.evaluation.metrics import mean_grey
from research.evaluation.provenance import run_provenance
from research.evaluation.run import MAX_PER_CLASS
from research.evaluation.settings import GuidanceSetting, Row, default_settings
from research.generate import DEFAULT_MAX_ROWS, DEFAULT_MODEL, positive_int

REAL_ROW = "real test images"
SHOES = ("Sandal", "Sneaker", "Ankle boot")  # the classes that face one way in the data set
SAMPLED = ("cfg s=1", "cfg s=2", "cfg s=3")  # with the default request after cfg s=1


@dataclass
class CheckRow:
    name: str
    kind: str  # "real", "degraded" or "sampled"
    mean_pixel: float
    shoes_facing_as_real: float  # the share of shoe images facing the way the train split's do
    judges: dict[str, JudgedMetrics]


@dataclass
class JudgesCheck:
    command: str
    date_utc: str
    machine: str
    git_commit: str
    checkpoint: str
    checkpoint_sha256: str
    checkpoint_steps: int | None
    class_names: list[str]
    per_class: int
    n: int
    seed: int
    sampler: str
    steps: int
    judges: dict[str, JudgeSummary]
    reference_size: int
    manifold_reference_size: int
    rows: list[CheckRow]
    timings_s: dict[str, float] = field(default_factory=dict)


def sampled_settings() -> list[GuidanceSetting]:
    by_name = {s.name: s for s in default_settings()}
    default = GuidanceSetting("default request", DEFAULT_GUIDANCE)
    return [by_name["cfg s=1"], default, *(by_name[name] for name in SAMPLED[1:])]


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Model-range images (N, C, H, W) back to uint8 (N, H, W, C): the test split's own grey levels."""
    return images.add(1).mul(127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


def run_check(args: argparse.Namespace, command: str) -> tuple[JudgesCheck, list[tuple[np.ndarray, np.ndarray]]]:
    """The check, and each set's uint8 images with their requested classes."""
    timings: dict[str, float] = {}
    started = time.monotonic()
    model = load_checkpoint(args.model, args.device)
    provenance = run_provenance(command, args.model, model.manifest)  # at the start: the tree may change meanwhile
    train_data = load_fashion_mnist("train", args.data_dir)
    test_images, test_labels = load_fashion_mnist("test", args.data_dir)
    judges = load_judges(args, train_data)
    labels = test_labels.numpy()
    split = real_split(labels, args.per_class, args.seed)
    references = [judge_reference(j, test_images, labels, split) for j in judges]
    timings["judges"] = time.monotonic() - started

    real = to_uint8(test_images[split.subset])
    real_labels = labels[split.subset]
    sets = [(REAL_ROW, "real", real, real_labels)]
    sets += [(d.name, "degraded", d.apply(real, real_labels), real_labels) for d in degradations(args.seed)]
    if not args.no_sampling:
        t0 = time.monotonic()
        rows = [Row(s, args.sampler) for s in sampled_settings()]
        drawn = draw_rows(model, rows, args.per_class, args.steps, args.seed, args.max_rows)
        requested = np.repeat(np.arange(model.manifest.num_classes), args.per_class)
        sets += [
            (f"{row.setting.name} ({row.sampler})", "sampled", x, requested) for row, x in zip(rows, drawn, strict=True)
        ]
        timings["sampling"] = time.monotonic() - t0

    train_uint8, train_labels = to_uint8(train_data[0]), train_data[1].numpy()
    class_means = np.stack([train_uint8[train_labels == c].mean(axis=0) for c in range(len(CLASS_NAMES))])
    shoe_classes = [CLASS_NAMES.index(name) for name in SHOES]
    results = []
    for name, kind, images, requested in sets:
        x = uint8_to_model_images(images)
        judged = {}
        for ref in references:
            scored: Scored = score(ref.judge.model, x)
            judged[ref.judge.name] = judge_set(ref, scored, requested)
        shoes = np.isin(requested, shoe_classes)
        facing = float(facing_as_class_mean(images[shoes], requested[shoes], class_means).mean())
        results.append(CheckRow(name, kind, mean_grey(x), facing, judged))
    timings["total"] = time.monotonic() - started
    check = JudgesCheck(
        **provenance,
        per_class=args.per_class,
        n=int(split.subset.size),
        seed=args.seed,
        sampler=args.sampler,
        steps=args.steps,
        judges={
            r.judge.name: JudgeSummary(r.judge.title, r.judge.source, r.test_accuracy, int(r.test.features.shape[1]))
            for r in references
        },
        reference_size=int(split.rest.size),
        manifold_reference_size=int(split.manifold.size),
        rows=results,
        timings_s=timings,
    )
    return check, [(images, requested) for _, _, images, requested in sets]


# ---- the report ----------------------------------------------------------------------------------------


def judge_table(check: JudgesCheck, judge: str) -> list[str]:
    real = check.rows[0].judges[judge]
    lines = [
        "| set | accuracy | FID | FID / real | diversity | precision | recall | density | coverage | mean grey |",
        "|---|" + "---:|" * 9,
    ]
    for row in check.rows:
        m = row.judges[judge]
        lines.append(
            f"| {row.name} | {m.accuracy:.3f} | {m.fid:.2f} | {m.fid / real.fid:.2f} | {m.diversity:.2f} | "
            f"{m.precision:.3f} | {m.recall:.3f} | {m.density:.3f} | {m.coverage:.3f} | {row.mean_pixel:.1f} |"
        )
    return lines


def side_by_side(check: JudgesCheck) -> list[str]:
    """Accuracy, FID over the real row's, precision and coverage, one judge beside the other."""
    names = list(check.judges)
    short = {name: check.judges[name].title.split(": ")[-1] for name in names}
    metrics = [("accuracy", "accuracy"), ("FID / real", None), ("precision", "precision"), ("coverage", "coverage")]
    header = "| set | " + " | ".join(f"{label} {short[n]}" for label, _ in metrics for n in names)
    lines = [header + " | mean grey | shoes facing as real |", "|---|" + "---:|" * (len(metrics) * len(names) + 2)]
    for row in check.rows:
        cells = []
        for _, key in metrics:
            for n in names:
                m = row.judges[n]
                cells.append(f"{m.fid / check.rows[0].judges[n].fid:.2f}" if key is None else f"{getattr(m, key):.3f}")
        cells += [f"{row.mean_pixel:.1f}", f"{row.shoes_facing_as_real:.2f}"]
        lines.append(f"| {row.name} | " + " | ".join(cells) + " |")
    return lines


def render_markdown(check: JudgesCheck, grid_png: str) -> str:
    lines = [
        "# The judges on images whose flaws are known",
        "",
        "Written by `python -m research.evaluation.judges.check`; rerun it to refresh this page. "
        "What the figures say: docs/judges.md.",
        "",
        f"- command: `{check.command}`",
        f"- date: {check.date_utc}",
        f"- machine: {check.machine}",
        f"- git commit: `{check.git_commit}`",
        f"- checkpoint: `{check.checkpoint}`, weights sha256 `{check.checkpoint_sha256}`",
        f"- n = {check.n} images per set ({check.per_class} per class). Real and degraded sets: the same "
        f"{check.n} test images; sampled sets: {check.sampler}, {check.steps} steps, seeds {check.seed}.., the "
        "same seeds in every set",
        f"- references: FID against the {check.reference_size} other test images; precision, recall, density "
        f"and coverage against {check.manifold_reference_size} other test images, class-balanced",
        "- judges: "
        + "; ".join(
            f"**{j.title}** ({j.source}), test accuracy {j.test_accuracy:.4f}, {j.feature_dim}-d features"
            for j in check.judges.values()
        ),
        "- time: " + ", ".join(f"{k} {v:.0f} s" for k, v in check.timings_s.items()),
        "",
        "## Side by side",
        "",
        *side_by_side(check),
    ]
    for name, judge in check.judges.items():
        lines += ["", f"## Under {judge.title}", "", *judge_table(check, name)]
    lines += [
        "",
        "- **accuracy**: the judge's accuracy on the requested class; for a class mix, the class of the first "
        "image (the top half, in the halves mix).",
        "- **FID / real**: over the FID of the real row, the floor at this n; FIDs of the two judges are in "
        "different feature spaces and compare only as such ratios.",
        "- **precision / recall** (k = 3), **density / coverage** (k = 5): see research/evaluation/manifold.py.",
        "- **shoes facing as real**: of the set's " + ", ".join(SHOES) + " images, the share that correlate "
        "better with their class's mean train image than with that mean mirrored; no judge is needed for it.",
        "",
        "## The sets",
        "",
        "Rows: sets; columns: classes, the first image of each.",
        "",
        f"![one image per class of each set]({grid_png})",
        "",
    ]
    return "\n".join(lines)


def check_grid(check: JudgesCheck, sets: list[tuple[np.ndarray, np.ndarray]]) -> Image.Image:
    """A row per set, a column per class: the set's first image of that class."""
    classes = range(len(check.class_names))
    cells = np.stack([images[np.flatnonzero(requested == c)[0]] for images, requested in sets for c in classes])
    col_labels = [name.split("/")[0] for name in check.class_names]
    return labelled_grid(cells, len(check.class_names), [r.name for r in check.rows], col_labels, zoom=2, font_size=12)


def write_outputs(args: argparse.Namespace, check: JudgesCheck, sets: list[tuple[np.ndarray, np.ndarray]]) -> None:
    for path in (args.grid, args.report, args.json):
        path.parent.mkdir(parents=True, exist_ok=True)
    check_grid(check, sets).save(args.grid, format="PNG")
    args.report.write_text(render_markdown(check, os.path.relpath(args.grid, args.report.parent)))
    args.json.write_text(json.dumps(asdict(check), indent=2) + "\n")


# ---- command line --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m research.evaluation.judges.check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="checkpoint folder (default: %(default)s)")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    p.add_argument("--per-class", type=positive_int, default=20, help="images per class and set (default 20)")
    p.add_argument("--steps", type=positive_int, default=20)
    p.add_argument("--sampler", choices=sorted(SAMPLERS), default=DEFAULT_SAMPLER)
    p.add_argument("--seed", type=int, default=0, help="first sampling seed; also picks the real images")
    p.add_argument("--no-sampling", action="store_true", help="the real and degraded sets only")
    p.add_argument("--max-rows", type=positive_int, default=DEFAULT_MAX_ROWS, help="model rows per forward")
    add_classifier_arguments(p)
    p.add_argument("--report", type=Path, default=Path("docs/judges-check.md"))
    p.add_argument("--json", type=Path, default=Path("docs/judges-check.json"))
    p.add_argument("--grid", type=Path, default=None, help="default: img/<report's name>.png beside --report")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = "python -m research.evaluation.judges.check " + shlex.join(sys.argv[1:] if argv is None else argv)
    if args.grid is None:
        args.grid = args.report.parent / "img" / f"{args.report.stem}.png"
    if not 1 <= args.per_class <= MAX_PER_CLASS:
        parser.error(f"argument --per-class: must be between 1 and {MAX_PER_CLASS}, got {args.per_class}")
    try:
        check, sets = run_check(args, command.strip())
    except (CheckpointError, DatasetMissingError, JudgeLoadError) as exc:
        sys.exit(f"error: {exc}")
    write_outputs(args, check, sets)
    print("\n".join(side_by_side(check)))
    print(f"wrote {args.report}, {args.json}, {args.grid}")


if __name__ == "__main__":
    main()
