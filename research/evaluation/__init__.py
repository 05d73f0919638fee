"""Measure a checkpoint's samples with a Fashion-MNIST classifier.

metrics.py     FID, Gaussian statistics, diversity, accuracy, mean grey: pure functions
classifier.py  the scoring CNN: train, cache (safetensors), load, score
run.py         the scale-sweep evaluation (python -m research.evaluate: docs/quality.md)
report.py      its markdown, plot, JSON and console summary
cli.py         its command line
settings.py    named guidance settings for the methods table, and their JSON form
methods.py     the guidance-methods table (python -m research.evaluation.methods: docs/guidance.md)
provenance.py  machine, commit and date for the reports
"""
