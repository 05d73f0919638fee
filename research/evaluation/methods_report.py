"""The guidance-methods table's report: markdown (a table per judge), the image grid, the JSON and the
console summary."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from dataclasses import asdict

import numpy as np
from PIL import Image

from app.images import labelled_grid
from research.evaluation.judges.scoring import JudgedMetrics
from research.evaluation.methods_table import MethodsTable
from research.evaluation.settings import Row

METRIC_NOTES = [
    "- **accuracy**: the judge's accuracy on the requested class.",
    "- **FID**: Frechet distance in the judge's feature space to the {reference_size} test images not in the "
    "real row (as in docs/quality.md); the real row is the floor at this n. **FID / s=1**: over the FID of the "
    "same sampler's `cfg s=1` row.",
    "- **diversity**: mean pairwise feature distance within each class, averaged over the classes; **/ s=1** as "
    "for FID.",
    "- **precision / recall** (Kynkaanniemi et al. 2019, k = 3): the share of the n images inside the real "
    "manifold, and of real images inside theirs; **density / coverage** (Naeem et al. 2020, k = 5): real "
    "neighbourhoods holding each image, over k (1 for real-like spread), and the share of real neighbourhoods "
    "holding one. The real manifold is {manifold_size} other test images, class-balanced, as many as the n "
    "images; the real row is the same metrics between two disjoint real sets.",
    "- **mean grey**: the mean grey level (0..255) of the n images; the same under both judges.",
]


def methods_grid(images: Sequence[np.ndarray], rows: Sequence[Row], class_names: Sequence[str]) -> Image.Image:
    """A row per table row, labelled with its setting and sampler; a column per class (its first seed)."""
    per_class = images[0].shape[0] // len(class_names)
    cells = np.stack([row_images[c * per_class] for row_images in images for c in range(len(class_names))])
    col_labels = [name.split("/")[0] for name in class_names]
    return labelled_grid(cells, len(class_names), [row.label for row in rows], col_labels, zoom=3, font_size=13)


def judge_table(table: MethodsTable, judge: str) -> list[str]:
    """One judge's table: a row per setting and sampler, then the real row."""
    lines = [
        "| setting | sampler | accuracy | FID | FID / s=1 | diversity | diversity / s=1 | precision | recall | "
        "density | coverage | mean grey |",
        "|---|---|" + "---:|" * 10,
    ]
    for r in table.results:
        m = r.judges[judge]
        lines.append(
            f"| `{r.name}` | {r.sampler} | {m.accuracy:.3f} | {m.fid:.2f} | {m.fid_vs_s1:.2f} | {m.diversity:.2f} | "
            f"{m.diversity_vs_s1:.2f} | {m.precision:.3f} | {m.recall:.3f} | {m.density:.3f} | {m.coverage:.3f} | "
            f"{r.mean_pixel:.1f} |"
        )
    real = table.real.judges[judge]
    lines.append(
        f"| real test images (n = {table.real.n}) | – | {real.accuracy:.3f} | {real.fid:.2f} | – | "
        f"{real.diversity:.2f} | – | {real.precision:.3f} | {real.recall:.3f} | {real.density:.3f} | "
        f"{real.coverage:.3f} | {table.real.mean_pixel:.1f} |"
    )
    return lines


def render_markdown(table: MethodsTable, grid_png: str, title: str = "Guidance methods at the same seeds") -> str:
    n = table.per_class * len(table.class_names)
    lines = [
        f"# {title}",
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
        f"seeds {table.seed}.., the same seeds in every row"
        + ("" if table.precision == "fp32" else f"; the model's forward at **{table.precision}**"),
        "- judges (docs/judges.md): "
        + "; ".join(
            f"**{j.title}** ({j.source}), test accuracy {j.test_accuracy:.4f}, {j.feature_dim}-d features"
            for j in table.judges.values()
        ),
        "- time: " + ", ".join(f"{k} {v:.0f} s" for k, v in table.timings_s.items()),
    ]
    for name, judge in table.judges.items():
        lines += ["", f"## Under {judge.title}", "", *judge_table(table, name)]
    notes = [note.format(reference_size=table.reference_size, manifold_size=table.manifold_reference_size)
             for note in METRIC_NOTES]  # fmt: skip
    lines += [
        "",
        *notes,
        "",
        "## Settings",
        "",
        "Each setting as `--extra` takes it (fields left out have the defaults of `app/guidance/` and "
        "`app/sampling/spec.py`):",
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
    args.report.write_text(render_markdown(table, os.path.relpath(args.grid, args.report.parent), args.title))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(asdict(table), indent=2) + "\n")


def print_summary(table: MethodsTable) -> None:
    width = max(len(r.name) for r in table.results)
    for name, judge in table.judges.items():
        print(f"{judge.title} (test accuracy {judge.test_accuracy:.4f})")
        print(f"{'setting':<{width}} {'sampler':>9} {'accuracy':>9} {'FID':>8} {'/s=1':>6} {'diversity':>10} "
              f"{'prec':>6} {'recall':>6} {'dens':>6} {'cover':>6} {'pixel':>6}")  # fmt: skip
        rows: list[tuple[str, str, JudgedMetrics, str, float]] = [
            (r.name, r.sampler, r.judges[name], f"{r.judges[name].fid_vs_s1:>6.2f}", r.mean_pixel)
            for r in table.results
        ]
        rows.append(
            (f"real (n = {table.real.n})"[:width], "", table.real.judges[name], f"{'':>6}", table.real.mean_pixel)
        )
        for label, sampler, m, ratio, pixel in rows:
            print(
                f"{label:<{width}} {sampler:>9} {m.accuracy:>9.3f} {m.fid:>8.2f} {ratio} {m.diversity:>10.2f} "
                f"{m.precision:>6.3f} {m.recall:>6.3f} {m.density:>6.3f} {m.coverage:>6.3f} {pixel:>6.1f}"
            )
