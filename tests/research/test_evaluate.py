"""research.evaluate is the command's module; its code lives in research.evaluation (tests in tests/evaluation/)."""

import importlib
import re
from pathlib import Path

import research.evaluate
import research.evaluation.cli
import research.evaluation.provenance

REPO = Path(__file__).resolve().parents[2]


def test_cfg_evaluate_entry_point_is_the_evaluation_cli():
    (target,) = re.findall(r'^cfg-evaluate = "(.+)"$', (REPO / "pyproject.toml").read_text(), re.M)
    module, _, name = target.partition(":")
    assert getattr(importlib.import_module(module), name) is research.evaluation.cli.main


def test_names_imported_from_app_evaluate_still_resolve():
    # bench/bench_service.py reads these two from research.evaluate.
    assert research.evaluate.git_commit is research.evaluation.provenance.git_commit
    assert research.evaluate.machine_description is research.evaluation.provenance.machine_description
    for name in research.evaluate.__all__:
        assert hasattr(research.evaluate, name), name
