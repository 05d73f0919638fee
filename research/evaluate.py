"""Measure the guidance trade-off of a checkpoint: python -m research.evaluate (see research/evaluation/cli.py).
The guidance-methods table is python -m research.evaluation.methods.

The code lives in the research.evaluation package; this module keeps the command, the cfg-evaluate entry
point and the names other code imports from here.
"""

from research.evaluation.classifier import (
    FashionClassifier,
    Scored,
    get_classifier,
    load_classifier,
    save_classifier,
    score,
    train_classifier,
    uint8_to_model_images,
)
from research.evaluation.cli import build_parser, main
from research.evaluation.metrics import (
    GaussianStats,
    accuracy,
    fid,
    frechet_distance,
    gaussian_stats,
    mean_grey,
    mean_pairwise_distance,
    split_real_baseline,
    sqrtm_psd,
    within_class_diversity,
)
from research.evaluation.provenance import git_commit, machine_description
from research.evaluation.run import Evaluation, RealBaseline, ScaleResult, check_targets, run_evaluation, score_scales

__all__ = [
    "Evaluation",
    "FashionClassifier",
    "GaussianStats",
    "RealBaseline",
    "ScaleResult",
    "Scored",
    "accuracy",
    "build_parser",
    "check_targets",
    "fid",
    "frechet_distance",
    "gaussian_stats",
    "get_classifier",
    "git_commit",
    "load_classifier",
    "machine_description",
    "main",
    "mean_grey",
    "mean_pairwise_distance",
    "run_evaluation",
    "save_classifier",
    "score",
    "score_scales",
    "split_real_baseline",
    "sqrtm_psd",
    "train_classifier",
    "uint8_to_model_images",
    "within_class_diversity",
]

if __name__ == "__main__":
    main()
