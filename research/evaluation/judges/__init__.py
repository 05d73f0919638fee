"""The judges that score generated images: two Fashion-MNIST classifiers whose predictions give accuracy
and whose features give FID, diversity, precision, recall, density and coverage (docs/judges.md).

  cnn     research/evaluation/classifier.py: a small CNN (3 epochs, Adam), committed in cnn-fmnist/; other
          --classifier-* settings train one on the fly and cache it
  resnet  resnet.py: a residual network trained once (train.py) and committed in resnet-fmnist/

scoring.py  each judge's references on the test split, and the metrics of an image set under a judge
check.py    the judges on deliberately degraded real images and a few sampler settings
            (python -m research.evaluation.judges.check: docs/judges-check.md)
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from research.evaluation.classifier import FeatureClassifier, classifier_setup, committed_setup, get_classifier
from research.evaluation.judges.resnet import load_resnet_judge


@dataclass(frozen=True)
class Judge:
    name: str  # the key in reports' JSON
    title: str  # what the reports call it
    model: FeatureClassifier
    source: str  # where its weights come from


def load_judges(args: argparse.Namespace, train_data: tuple[torch.Tensor, torch.Tensor]) -> list[Judge]:
    """Both judges: the CNN from its committed weights (sha256 checked) where the --classifier-* flags are the
    defaults, else from its cache (trained first where the cache has no match); the ResNet from its committed
    weights (sha256 checked)."""
    cnn = get_classifier(args.classifier_cache, args.classifier_epochs, args.classifier_train_images, train_data)
    setup = classifier_setup(args.classifier_epochs, args.classifier_train_images, len(train_data[0]))
    if committed_setup(setup):
        cnn_source = "research/evaluation/judges/cnn-fmnist, committed"
    else:
        cnn_source = f"research/evaluation/classifier.py, trained here for {args.classifier_epochs} epochs and cached"
    resnet, manifest = load_resnet_judge()
    return [
        Judge(
            "cnn",
            "judge 1: small CNN",
            cnn,
            cnn_source,
        ),
        Judge(
            "resnet",
            "judge 2: ResNet",
            resnet,
            f"research/evaluation/judges/resnet-fmnist, weights sha256 {manifest.weights_sha256[:16]}..., "
            f"trained by `{manifest.training['command']}`",
        ),
    ]
