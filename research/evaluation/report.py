"""The evaluation's report: markdown, the trade-off plot, the JSON and the console summary."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from research.evaluation.run import Evaluation, RealBaseline, SamplerResults, ScaleResult, check_targets
from research.generate import sweep_image


def render_markdown(ev: Evaluation, tradeoff_png: str, sweep_png: str) -> str:
    n = ev.per_class * len(ev.class_names)
    lines = [
        "# Sample quality vs guidance scale",
        "",
        "Written by `research/evaluate.py`; rerun it to refresh this page.",
        "",
        f"- command: `{ev.command}`",
        f"- date: {ev.date_utc}",
        f"- machine: {ev.machine}",
        f"- git commit: `{ev.git_commit}`",
        f"- checkpoint: `{ev.checkpoint}`, weights sha256 `{ev.checkpoint_sha256}`"
        + (f", {ev.checkpoint_steps} training steps" if ev.checkpoint_steps is not None else ""),
        f"- sampling: {ev.sampler}, {ev.steps} steps, {ev.per_class} images per class (n = {n} per scale), "
        f"seeds {ev.seed}.., the same seeds at every scale",
        f"- scoring classifier: small CNN trained on the train split, test accuracy {ev.classifier_test_accuracy:.4f}",
        "- time: " + ", ".join(f"{k} {v:.0f} s" for k, v in ev.timings_s.items()),
        "",
        "Guidance scale s: eps = eps_uncond + s (eps_cond - eps_uncond); s = 0 is the unconditional model, "
        "s = 1 the conditional model without guidance.",
        "",
        *metric_table(ev.results, ev.real),
        f"| real test images (n = {ev.real.n}) | {ev.real.accuracy:.3f} | {ev.real.fid:.2f} | 1.00 | "
        f"{ev.real.diversity:.2f} | 1.00 | {ev.real.mean_pixel:.1f} |",
    ]
    lines += [
        "",
        "- **accuracy**: the classifier's accuracy on the requested class (at s = 0 the model is "
        "unconditional, so about 0.1 is expected); on the real row, its accuracy on those test images.",
        "- **FID**: Frechet distance between Gaussians fitted to the classifier's "
        f"{ev.feature_dim}-d penultimate features of the n images and of the reference: the "
        f"{ev.reference_size} test images not in the real row's subset. The real row is n other test "
        "images, class-balanced, so its FID has the same finite-sample bias and is the floor to compare "
        "with. Not comparable to Inception FID.",
        "- **diversity**: mean pairwise distance between feature vectors of images of the same requested "
        "class, averaged over the classes. At s = 0 the samples are unconditional: the groups are seed "
        "groups, not classes, so that value measures diversity across classes.",
        "- **mean pixel**: the mean grey level (0..255) of the n images; a sampler that runs bright shows here.",
        "",
        "## Targets",
        "",
        "| target | met | value |",
        "|---|:---:|---|",
    ]
    for check in check_targets(ev):
        lines.append(f"| {check.name} | {'yes' if check.passed else '**no**'} | {check.detail} |")
    if ev.sampler_comparison:
        lines += [
            "",
            "## Samplers",
            "",
            f"The same seeds and n = {n} per scale, {ev.steps} steps each; the first row is the sampler above.",
            "",
            *metric_table([], ev.real, sampler_column=True),
        ]
        for entry in ev.sampler_comparison:
            lines += [f"| {entry.sampler} " + row for row in metric_table(entry.results, ev.real)[2:]]
    lines += [
        "",
        "## Accuracy per class",
        "",
        "| class | " + " | ".join(f"s={r.guidance_scale:g}" for r in ev.results) + " |",
        "|---|" + "---:|" * len(ev.results),
    ]
    for c, name in enumerate(ev.class_names):
        lines.append(f"| {name} | " + " | ".join(f"{r.accuracy_per_class[c]:.2f}" for r in ev.results) + " |")
    lines += [
        "",
        "## Trade-off",
        "",
        f"![accuracy and FID against guidance scale]({tradeoff_png})",
        "",
        "## Samples",
        "",
        "Rows: classes, two seeds each; columns: guidance scales. A row keeps its seed across the scales.",
        "",
        f"![samples per class and guidance scale]({sweep_png})",
        "",
    ]
    return "\n".join(lines)


def metric_table(results: Sequence[ScaleResult], real: RealBaseline, sampler_column: bool = False) -> list[str]:
    """Header, separator and one row per scale of the metrics table, in markdown.

    sampler_column puts a sampler column first in the header; its rows' cells are the caller's."""
    lead, lead_rule = ("| sampler ", "|---") if sampler_column else ("", "")
    lines = [
        lead + "| scale s | accuracy | FID | FID / real | diversity | diversity / real | mean pixel |",
        lead_rule + "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.guidance_scale:g} | {r.accuracy:.3f} | {r.fid:.2f} | {r.fid / real.fid:.2f} | "
            f"{r.diversity:.2f} | {r.diversity / real.diversity:.2f} | {r.mean_pixel:.1f} |"
        )
    return lines


def plot_tradeoff(ev: Evaluation, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = [r.guidance_scale for r in ev.results]
    fig, ax_acc = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    ax_acc.plot(scales, [r.accuracy for r in ev.results], "o-", color="tab:blue", label="accuracy (generated)")
    ax_acc.axhline(ev.real.accuracy, color="tab:blue", ls=":", label="accuracy (real test images)")
    ax_acc.set_xlabel("guidance scale s")
    ax_acc.set_ylabel("classifier accuracy on requested class", color="tab:blue")
    ax_acc.set_ylim(0, 1.02)
    ax_fid = ax_acc.twinx()
    ax_fid.plot(scales, [r.fid for r in ev.results], "s-", color="tab:red", label="FID (generated)")
    ax_fid.axhline(ev.real.fid, color="tab:red", ls=":", label=f"FID (real, n = {ev.real.n})")
    ax_fid.set_ylabel("FID in classifier feature space", color="tab:red")
    ax_fid.set_ylim(bottom=0)
    handles = ax_acc.get_legend_handles_labels()[0] + ax_fid.get_legend_handles_labels()[0]
    ax_acc.legend(handles=handles, loc="center right", fontsize=8)
    ax_acc.set_title(f"{ev.sampler}, {ev.steps} steps, n = {ev.real.n} per scale")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def write_outputs(args: argparse.Namespace, ev: Evaluation, images: list[np.ndarray]) -> None:
    tradeoff = args.img_dir / "tradeoff.png"
    sweep = args.img_dir / "sweep.png"
    plot_tradeoff(ev, tradeoff)
    sweep_image(images, ev.class_names, args.scales, zoom=2, max_per_class=2).save(sweep, format="PNG")
    report_dir = args.report.parent
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(
        render_markdown(ev, os.path.relpath(tradeoff, report_dir), os.path.relpath(sweep, report_dir))
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    results = {**asdict(ev), "targets": [asdict(c) for c in check_targets(ev)]}
    args.json.write_text(json.dumps(results, indent=2) + "\n")


def print_summary(ev: Evaluation) -> None:
    print(f"{'sampler':>9} {'scale':>6} {'accuracy':>9} {'FID':>8} {'diversity':>10} {'pixel':>6}")
    for entry in [SamplerResults(ev.sampler, ev.results), *ev.sampler_comparison[1:]]:
        for r in entry.results:
            print(
                f"{entry.sampler:>9} {r.guidance_scale:>6g} {r.accuracy:>9.3f} {r.fid:>8.2f} {r.diversity:>10.2f} "
                f"{r.mean_pixel:>6.1f}"
            )
    real = ev.real
    print(
        f"{'real':>9} {'':>6} {real.accuracy:>9.3f} {real.fid:>8.2f} {real.diversity:>10.2f} {real.mean_pixel:>6.1f}"
        f"  (n = {real.n})"
    )
    for check in check_targets(ev):
        print(f"[{'ok' if check.passed else 'MISSED'}] {check.name}: {check.detail}")
