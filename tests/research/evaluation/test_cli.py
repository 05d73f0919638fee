import json
import os
from pathlib import Path

import pytest
from PIL import Image

from app.sampling import DEFAULT_SAMPLER
from research.evaluation.cli import main

pytestmark = pytest.mark.integration  # the shipped checkpoint

# The shipped checkpoint. CFG_TEST_CHECKPOINT points elsewhere only for local work before it is copied in.
CHECKPOINT = Path(os.environ.get("CFG_TEST_CHECKPOINT", "model_store/fashion-mnist-cfg"))


def test_evaluate_cli_on_a_tiny_config(tmp_path, capsys):
    if not (CHECKPOINT / "manifest.json").is_file():
        pytest.fail(f"shipped checkpoint missing at {CHECKPOINT}; copy it there (or set CFG_TEST_CHECKPOINT)")
    argv = ["--model", str(CHECKPOINT), "--per-class", "2", "--scales", "0,3", "--steps", "2",
            "--classifier-epochs", "1", "--classifier-train-images", "1000",
            "--classifier-cache", str(tmp_path / "cache" / "clf.safetensors"),
            "--report", str(tmp_path / "quality.md"), "--json", str(tmp_path / "quality.json"),
            "--img-dir", str(tmp_path / "img"), "--compare-samplers", "ddim", "--compare-scales", "3"]  # fmt: skip
    main(argv)
    out = capsys.readouterr().out
    assert "trained and cached" in out and "classifier test accuracy" in out
    assert (tmp_path / "cache" / "clf.safetensors").is_file()

    results = json.loads((tmp_path / "quality.json").read_text())
    assert [r["guidance_scale"] for r in results["results"]] == [0.0, 3.0]
    assert results["real"]["n"] == 20
    assert results["checkpoint_sha256"] in (tmp_path / "quality.md").read_text()
    report = (tmp_path / "quality.md").read_text()
    assert "| 3 |" in report and "real test images (n = 20)" in report and "img/tradeoff.png" in report
    assert [(c["sampler"], [r["guidance_scale"] for r in c["results"]]) for c in results["sampler_comparison"]] == [
        (DEFAULT_SAMPLER, [3.0]),  # the default sampler first
        ("ddim", [3.0]),
    ]
    assert "| ddim | 3 |" in report
    for name in ("tradeoff.png", "sweep.png"):
        with Image.open(tmp_path / "img" / name) as image:
            assert image.format == "PNG"

    main(argv)  # the second run reuses the cached classifier
    assert "classifier: cached" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--per-class", "501"], "--per-class: must be between 2 and 500"),
        (["--per-class", "1"], "--per-class: must be between 2 and 500"),
        (["--compare-samplers", "ddim,plms"], "unknown sampler(s) ['plms']"),
        (["--compare-samplers", "ddim", "--compare-scales", "4"], "--compare-scales: every scale must also be in"),
        (["--scales", "1,-2"], "must be 0 or more"),
    ],
)
def test_bad_arguments_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
