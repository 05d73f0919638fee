"""Measure the guidance trade-off of a checkpoint: python -m app.evaluate.

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
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from app.data import DEFAULT_DATA_DIR, DatasetMissingError, load_fashion_mnist
from app.generate import (
    DEFAULT_MAX_ROWS,
    DEFAULT_MODEL,
    DEFAULT_SCALES,
    generate,
    positive_int,
    scale_list,
    sweep_image,
    sweep_specs,
    total_steps,
)
from app.models import CheckpointError, LoadedModel, load_checkpoint
from app.sampling import DEFAULT_SAMPLER, SAMPLERS

DEFAULT_CLASSIFIER_CACHE = Path("~/.cache/cfg-serve/classifier.safetensors")
DEFAULT_PER_CLASS = 64
MAX_PER_CLASS = 500
CLASSIFIER_ARCH = "cnn-32-64-64-fc128-v1"


# ---- metrics: pure functions over feature arrays ---------------------------------------------------


@dataclass(frozen=True)
class GaussianStats:
    mu: np.ndarray  # (D,)
    sigma: np.ndarray  # (D, D)


def gaussian_stats(features: np.ndarray) -> GaussianStats:
    """Mean and (unbiased) covariance of (N, D) features, in float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need at least 2 feature rows (N, D), got shape {features.shape}")
    return GaussianStats(features.mean(axis=0), np.cov(features, rowvar=False).reshape(features.shape[1], -1))


def sqrtm_psd(matrix: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric positive semi-definite matrix, by eigendecomposition.

    Round-off can make tiny eigenvalues negative; they are clipped to 0.
    """
    eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T


def frechet_distance(a: GaussianStats, b: GaussianStats) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2) (Heusel et al. 2017, eq. 6;
    tr (S_a S_b)^1/2 equals tr (S_a^1/2 S_b S_a^1/2)^1/2, whose argument is symmetric PSD)."""
    root_a = sqrtm_psd(a.sigma)
    cross = np.linalg.eigvalsh(root_a @ b.sigma @ root_a)
    trace_sqrt = np.sqrt(np.clip(cross, 0, None)).sum()
    mean_term = float(np.sum((a.mu - b.mu) ** 2))
    return max(0.0, mean_term + float(np.trace(a.sigma) + np.trace(b.sigma) - 2 * trace_sqrt))


def fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets."""
    return frechet_distance(gaussian_stats(features_a), gaussian_stats(features_b))


def mean_pairwise_distance(features: np.ndarray) -> float:
    """Mean Euclidean distance over all unordered pairs of distinct rows."""
    x = torch.as_tensor(np.asarray(features, dtype=np.float64))
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"need at least 2 rows, got {n}")
    return float(torch.pdist(x).mean())


def within_class_diversity(features: np.ndarray, labels: np.ndarray) -> float:
    """mean_pairwise_distance within each class, averaged over the classes (each class weighs the same)."""
    labels = np.asarray(labels)
    return float(np.mean([mean_pairwise_distance(features[labels == c]) for c in np.unique(labels)]))


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.asarray(predictions) == np.asarray(labels)))


# ---- the classifier that scores samples -------------------------------------------------------------


class FashionClassifier(nn.Module):
    """A small CNN; features() is the penultimate layer used for FID and diversity."""

    def __init__(self, num_classes: int = 10, feature_dim: int = 128) -> None:
        super().__init__()

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)
            )

        self.body = nn.Sequential(
            block(1, 32), block(32, 64), nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Flatten(), nn.Linear(64 * 7 * 7, feature_dim), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(feature_dim, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    epochs: int,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    on_batch: Callable[[], None] | None = None,
) -> FashionClassifier:
    """Adam with a cosine learning rate; random horizontal flips, as the diffusion model was trained."""
    torch.manual_seed(seed)
    model = FashionClassifier(num_classes=int(labels.max()) + 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    batches_per_epoch = -(-images.shape[0] // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * batches_per_epoch)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(images.shape[0])
        for start in range(0, images.shape[0], batch_size):
            idx = order[start : start + batch_size]
            x = images[idx]
            flip = torch.rand(x.shape[0]) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            loss = F.cross_entropy(model(x), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if on_batch is not None:
                on_batch()
    return model.eval().requires_grad_(False)


def save_classifier(model: FashionClassifier, path: Path, metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, path, metadata={"arch": CLASSIFIER_ARCH, **metadata})


def load_classifier(path: Path, expect: dict[str, str]) -> FashionClassifier | None:
    """The cached classifier, or None where it is missing, unreadable, or was trained differently."""
    if not path.is_file():
        return None
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        state = load_file(path)
    except (SafetensorError, OSError):
        return None
    if any(metadata.get(k) != v for k, v in {"arch": CLASSIFIER_ARCH, **expect}.items()):
        return None
    model = FashionClassifier(num_classes=int(metadata.get("num_classes", 10)))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError:
        return None
    return model.eval().requires_grad_(False)


@dataclass(frozen=True)
class Scored:
    features: np.ndarray  # (N, D) float64
    predictions: np.ndarray  # (N,) int
    mean_pixel: float = float("nan")  # mean grey level of the images, 0..255


@torch.inference_mode()
def score(model: FashionClassifier, images: torch.Tensor, batch_size: int = 1000) -> Scored:
    """Features and predicted classes of float images (N, 1, H, W) in [-1, 1], averaged over the image
    and its mirror: the diffusion model learned mirrored garments, and a mirrored shoe is a correct shoe."""
    features, logits = [], []
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size]
        f = (model.features(x) + model.features(x.flip(-1))) / 2
        features.append(f)
        logits.append(model.head(f))  # the head is linear in eval mode: the mean of the two images' logits
    return Scored(torch.cat(features).double().numpy(), torch.cat(logits).argmax(1).numpy(), mean_grey(images))


def mean_grey(images: torch.Tensor) -> float:
    """The mean grey level, 0..255, of model-range images (-1..1)."""
    return float(images.mean().add(1).mul(127.5))


def uint8_to_model_images(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float (N, C, H, W) in [-1, 1], the scaling of app.data."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


# ---- the evaluation ----------------------------------------------------------------------------------


@dataclass
class ScaleResult:
    guidance_scale: float
    accuracy: float
    fid: float
    diversity: float
    mean_pixel: float  # mean grey level, 0..255: shows samples that run bright or dark
    accuracy_per_class: list[float]


@dataclass
class RealBaseline:
    n: int
    accuracy: float
    fid: float
    diversity: float
    mean_pixel: float


@dataclass
class SamplerResults:
    sampler: str
    results: list[ScaleResult]


@dataclass
class Evaluation:
    command: str
    date_utc: str
    machine: str
    git_commit: str
    checkpoint: str
    checkpoint_sha256: str
    checkpoint_steps: int | None
    class_names: list[str]
    sampler: str
    steps: int
    per_class: int
    seed: int
    classifier_test_accuracy: float
    feature_dim: int
    reference_size: int
    real: RealBaseline
    results: list[ScaleResult]
    sampler_comparison: list[SamplerResults] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)


def split_real_baseline(labels: np.ndarray, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a class-balanced subset of per_class images per class, and of the rest (the reference)."""
    rng = np.random.default_rng(seed)
    subset = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if per_class > members.size // 2:
            raise ValueError(f"--per-class {per_class} leaves too few test images of class {c} for the reference")
        subset.append(rng.choice(members, size=per_class, replace=False))
    subset = np.sort(np.concatenate(subset))
    return subset, np.setdiff1d(np.arange(labels.size), subset)


def score_scales(
    scored: Sequence[Scored], guidance_scales: Sequence[float], reference: GaussianStats, num_classes: int
) -> list[ScaleResult]:
    """scored[k] holds the images of scale k, class-major with the same count per class."""
    results = []
    for s, sc in zip(guidance_scales, scored, strict=True):
        requested = np.repeat(np.arange(num_classes), sc.predictions.size // num_classes)
        per_class = [accuracy(sc.predictions[requested == c], c) for c in range(num_classes)]
        results.append(
            ScaleResult(
                guidance_scale=float(s),
                accuracy=accuracy(sc.predictions, requested),
                fid=frechet_distance(gaussian_stats(sc.features), reference),
                diversity=within_class_diversity(sc.features, requested),
                mean_pixel=sc.mean_pixel,
                accuracy_per_class=per_class,
            )
        )
    return results


@dataclass(frozen=True)
class TargetCheck:
    name: str
    passed: bool
    detail: str


def check_targets(ev: Evaluation) -> list[TargetCheck]:
    """The targets the shipped checkpoint is meant to reach (see docs/quality.md)."""
    by_scale = {r.guidance_scale: r for r in ev.results}
    accs = [r.accuracy for r in ev.results]
    best = min(ev.results, key=lambda r: r.fid)
    ratio = best.fid / ev.real.fid if ev.real.fid > 0 else float("inf")
    checks = [
        TargetCheck(
            "accuracy rises with scale (0.01 tolerance)",
            all(b >= a - 0.01 for a, b in zip(accs, accs[1:], strict=False)),
            ", ".join(f"{a:.3f}" for a in accs),
        ),
        TargetCheck(
            "lowest FID at a moderate scale (1..3)",
            1 <= best.guidance_scale <= 3,
            f"s={best.guidance_scale:g}",
        ),
        TargetCheck(
            "best FID within 3x the real FID at the same n",
            ratio <= 3,
            f"{best.fid:.3g} vs {ev.real.fid:.3g} ({ratio:.2f}x)",
        ),
    ]
    if 3.0 in by_scale:
        acc = by_scale[3.0].accuracy
        checks.insert(1, TargetCheck("accuracy >= 0.95 at s=3", acc >= 0.95, f"{acc:.3f}"))
    if 1.0 in by_scale:
        acc = by_scale[1.0].accuracy
        checks.append(TargetCheck("s=1 recognizable: accuracy >= 0.7 (and see the sweep)", acc >= 0.7, f"{acc:.3f}"))
    return checks


# ---- the report -------------------------------------------------------------------------------------------


def render_markdown(ev: Evaluation, tradeoff_png: str, sweep_png: str) -> str:
    n = ev.per_class * len(ev.class_names)
    lines = [
        "# Sample quality vs guidance scale",
        "",
        "Written by `app/evaluate.py`; rerun it to refresh this page.",
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


# ---- command line ----------------------------------------------------------------------------------------


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
    p.add_argument("--classifier-cache", type=Path, default=DEFAULT_CLASSIFIER_CACHE)
    p.add_argument("--classifier-epochs", type=positive_int, default=3)
    p.add_argument(
        "--classifier-train-images", type=positive_int, default=None, help="train on the first N only (tests)"
    )
    p.add_argument("--report", type=Path, default=Path("docs/quality.md"))
    p.add_argument("--json", type=Path, default=Path("docs/quality.json"))
    p.add_argument("--img-dir", type=Path, default=Path("docs/img"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def get_classifier(args: argparse.Namespace, data: tuple[torch.Tensor, torch.Tensor]) -> FashionClassifier:
    """The cached classifier, or a new one trained on the train split and cached."""
    path = args.classifier_cache.expanduser()
    images, labels = data
    if args.classifier_train_images:
        images, labels = images[: args.classifier_train_images], labels[: args.classifier_train_images]
    setup = {"epochs": str(args.classifier_epochs), "train_images": str(images.shape[0]), "seed": "0"}
    model = load_classifier(path, setup)
    if model is not None:
        print(f"classifier: cached {path}")
        return model
    batches = args.classifier_epochs * -(-images.shape[0] // 128)
    with tqdm(total=batches, desc="classifier", unit="batch", dynamic_ncols=True, mininterval=2.0) as bar:
        model = train_classifier(images, labels, args.classifier_epochs, on_batch=bar.update)
    save_classifier(model, path, {**setup, "num_classes": str(int(labels.max()) + 1)})
    print(f"classifier: trained and cached at {path}")
    return model


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = torch.get_num_threads()
    device = f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__} with {threads} threads"
    if torch.cuda.is_available():
        device += f", GPU {torch.cuda.get_device_name()}"
    return f"{device}, Python {platform.python_version()}, {platform.system()}"


def git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + (" (working tree had uncommitted changes)" if dirty else "")


def real_baseline(
    classifier: FashionClassifier, test_images: torch.Tensor, test_labels: np.ndarray, per_class: int, seed: int
) -> tuple[GaussianStats, RealBaseline, Scored, int]:
    """Reference statistics of the test split less a class-balanced subset, and the metrics of that subset."""
    test = score(classifier, test_images)
    subset, rest = split_real_baseline(test_labels, per_class, seed)
    reference = gaussian_stats(test.features[rest])
    real = RealBaseline(
        n=subset.size,
        accuracy=accuracy(test.predictions[subset], test_labels[subset]),
        fid=frechet_distance(gaussian_stats(test.features[subset]), reference),
        diversity=within_class_diversity(test.features[subset], test_labels[subset]),
        mean_pixel=mean_grey(test_images[subset]),
    )
    return reference, real, test, int(rest.size)


def sample_and_score(
    args: argparse.Namespace,
    model: LoadedModel,
    classifier: FashionClassifier,
    reference: GaussianStats,
    sampler: str,
    guidance_scales: Sequence[float],
) -> tuple[list[ScaleResult], list[np.ndarray]]:
    """Draw per_class images of every class at each scale with one sampler, and score them."""
    num_classes = model.manifest.num_classes
    specs = sweep_specs(range(num_classes), guidance_scales, args.seed, args.per_class, args.steps, sampler)
    total = total_steps(specs, args.max_rows)
    with tqdm(total=total, desc=f"sampling ({sampler})", unit="step", dynamic_ncols=True) as bar:
        images = generate(model, specs, args.max_rows, on_step=bar.update)
    # images are class-major: images[c * len(scales) + k] is class c at scale k.
    ns = len(guidance_scales)
    scored = [score(classifier, uint8_to_model_images(np.concatenate(images[k::ns]))) for k in range(ns)]
    return score_scales(scored, guidance_scales, reference, num_classes), images


def run_evaluation(args: argparse.Namespace, model: LoadedModel, command: str) -> tuple[Evaluation, list]:
    timings: dict[str, float] = {}
    started = time.monotonic()
    train_data = load_fashion_mnist("train", args.data_dir)
    test_images, test_labels = load_fashion_mnist("test", args.data_dir)
    classifier = get_classifier(args, train_data)
    timings["classifier"] = time.monotonic() - started

    reference, real, test, reference_size = real_baseline(
        classifier, test_images, test_labels.numpy(), args.per_class, args.seed
    )
    test_accuracy = accuracy(test.predictions, test_labels.numpy())
    print(f"classifier test accuracy: {test_accuracy:.4f}")

    t0 = time.monotonic()
    results, images = sample_and_score(args, model, classifier, reference, args.sampler, args.scales)
    timings["sampling"] = time.monotonic() - t0
    comparison = []
    if args.compare_samplers:
        t0 = time.monotonic()
        by_scale = {r.guidance_scale: r for r in results}
        comparison.append(SamplerResults(args.sampler, [by_scale[s] for s in args.compare_scales]))
        for sampler in args.compare_samplers:
            if sampler != args.sampler:
                other, _ = sample_and_score(args, model, classifier, reference, sampler, args.compare_scales)
                comparison.append(SamplerResults(sampler, other))
        timings["sampler comparison"] = time.monotonic() - t0
    timings["total"] = time.monotonic() - started
    m = model.manifest
    ev = Evaluation(
        command=command,
        date_utc=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        machine=machine_description(),
        git_commit=git_commit(),
        checkpoint=str(args.model),
        checkpoint_sha256=m.weights_sha256,
        checkpoint_steps=m.training.get("steps_done"),
        class_names=list(m.class_names),
        sampler=args.sampler,
        steps=args.steps,
        per_class=args.per_class,
        seed=args.seed,
        classifier_test_accuracy=test_accuracy,
        feature_dim=int(test.features.shape[1]),
        reference_size=reference_size,
        real=real,
        results=results,
        sampler_comparison=comparison,
        timings_s=timings,
    )
    return ev, images


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


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = "python -m app.evaluate " + shlex.join(sys.argv[1:] if argv is None else argv)
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
