"""Measure a checkpoint's samples with Fashion-MNIST classifiers ("judges", docs/judges.md).

metrics.py        FID, Gaussian statistics, diversity, accuracy, mean grey: pure functions
manifold.py       precision, recall, density and coverage (k-NN manifolds): pure functions
classifier.py     judge 1, the scoring CNN: train, cache (safetensors), load, score
judges/           judge 2 (a committed ResNet: resnet.py, train.py), both judges' scoring (scoring.py),
                  and their check on degraded images (check.py: docs/judges-check.md)
run.py            the scale-sweep evaluation (python -m research.evaluate: docs/quality.md; judge 1 only)
report.py         its markdown, plot, JSON and console summary
cli.py            its command line
settings.py       named guidance settings for the methods table, and their JSON form
methods.py        the guidance-methods table under both judges (python -m research.evaluation.methods:
                  docs/guidance-table.md); methods_table.py its results, methods_report.py its report
provenance.py     machine, commit and date for the reports
"""
