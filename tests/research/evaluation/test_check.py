import json
import os
from pathlib import Path

import pytest
from PIL import Image

from research.evaluation.judges.check import main

pytestmark = pytest.mark.integration  # the shipped checkpoint and the judges

CHECKPOINT = Path(os.environ.get("CFG_TEST_CHECKPOINT", "model_store/fashion-mnist-cfg"))


def test_the_judges_check_scores_real_degraded_and_sampled_sets_under_both_judges(tmp_path, capsys):
    if not (CHECKPOINT / "manifest.json").is_file():
        pytest.fail(f"shipped checkpoint missing at {CHECKPOINT}; copy it there (or set CFG_TEST_CHECKPOINT)")
    report, results_json = tmp_path / "judges-check.md", tmp_path / "judges-check.json"
    argv = ["--model", str(CHECKPOINT), "--per-class", "2", "--steps", "2",
            "--classifier-epochs", "1", "--classifier-train-images", "1000",
            "--classifier-cache", str(tmp_path / "clf.safetensors"),
            "--report", str(report), "--json", str(results_json)]  # fmt: skip
    main(argv)
    assert "| set | accuracy small CNN | accuracy ResNet |" in capsys.readouterr().out

    check = json.loads(results_json.read_text())
    rows = check["rows"]
    assert check["n"] == 20 and check["sampler"] == "dpmpp_2m_karras"
    assert [r["kind"] for r in rows] == ["real"] + ["degraded"] * 7 + ["sampled"] * 4
    assert [r["name"] for r in rows[-4:]] == [
        "cfg s=1 (dpmpp_2m_karras)",
        "default request (dpmpp_2m_karras)",
        "cfg s=2 (dpmpp_2m_karras)",
        "cfg s=3 (dpmpp_2m_karras)",
    ]
    for r in rows:
        assert set(r["judges"]) == {"cnn", "resnet"}
    brighter = next(r for r in rows if r["name"].startswith("brighter +24"))
    assert brighter["mean_pixel"] == pytest.approx(min(255, rows[0]["mean_pixel"] + 24), abs=1)
    # Both judges score an image with its mirror: a mirrored set is the real set to them, though its
    # shoes face the other way.
    mirrored = next(r for r in rows if r["name"] == "mirrored (left-right)")
    for judge, real in rows[0]["judges"].items():
        assert mirrored["judges"][judge] == pytest.approx(real, rel=1e-6)  # to float round-off
    assert mirrored["shoes_facing_as_real"] == pytest.approx(1 - rows[0]["shoes_facing_as_real"])
    # The real row is the same metrics between two disjoint real sets: each judge's own.
    assert rows[0]["judges"]["cnn"]["fid"] != rows[0]["judges"]["resnet"]["fid"]

    text = report.read_text()
    assert "## Under judge 1: small CNN" in text and "## Under judge 2: ResNet" in text
    assert check["git_commit"] in text and "python -m research.evaluation.judges.check --model" in text
    m = rows[6]["judges"]["resnet"]  # the two-class mean
    assert f"| mix: mean of two classes | {m['accuracy']:.3f} | {m['fid']:.2f} |" in text.split("judge 2: ResNet")[-1]
    with Image.open(tmp_path / "img" / "judges-check.png") as grid:
        assert grid.format == "PNG" and grid.height > 11 * 56
