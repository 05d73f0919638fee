"""The guidance-methods table's results (python -m research.evaluation.methods): what its JSON holds."""

from __future__ import annotations

from dataclasses import dataclass, field

from research.evaluation.judges.scoring import JudgedMetrics


@dataclass
class MethodScores(JudgedMetrics):
    """A row's metrics under one judge, and its FID and diversity over its sampler's CFG s=1 row's."""

    fid_vs_s1: float = float("nan")
    diversity_vs_s1: float = float("nan")


@dataclass
class MethodResult:
    name: str
    sampler: str
    setting: dict  # the setting's JSON form: what --extra takes to draw it again
    mean_pixel: float  # mean grey level, 0..255: the images', whatever judges them
    judges: dict[str, MethodScores]  # by judge name


@dataclass
class JudgeSummary:
    title: str
    source: str
    test_accuracy: float  # on the whole test split
    feature_dim: int


@dataclass
class RealRow:
    n: int
    mean_pixel: float
    judges: dict[str, JudgedMetrics]


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
    judges: dict[str, JudgeSummary]
    reference_size: int  # test images in FID's reference
    manifold_reference_size: int  # test images in precision/recall/density/coverage's reference
    real: RealRow
    results: list[MethodResult]
    timings_s: dict[str, float] = field(default_factory=dict)
    precision: str = "fp32"  # the model's forward (app/models/fast.py)
