"""app.evaluate is the command's module; its code lives in app.evaluation (tests in tests/evaluation/)."""

import importlib
import re
from pathlib import Path

import app.evaluate
import app.evaluation.cli
import app.evaluation.provenance

REPO = Path(__file__).resolve().parent.parent


def test_cfg_evaluate_entry_point_is_the_evaluation_cli():
    (target,) = re.findall(r'^cfg-evaluate = "(.+)"$', (REPO / "pyproject.toml").read_text(), re.M)
    module, _, name = target.partition(":")
    assert getattr(importlib.import_module(module), name) is app.evaluation.cli.main


def test_names_imported_from_app_evaluate_still_resolve():
    # bench/bench_service.py reads these two from app.evaluate.
    assert app.evaluate.git_commit is app.evaluation.provenance.git_commit
    assert app.evaluate.machine_description is app.evaluation.provenance.machine_description
    for name in app.evaluate.__all__:
        assert hasattr(app.evaluate, name), name
