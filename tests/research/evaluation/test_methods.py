import json
import os
from pathlib import Path

import pytest
from PIL import Image

from research.evaluation.methods import main

# The shipped checkpoint. CFG_TEST_CHECKPOINT points elsewhere only for local work before it is copied in.
CHECKPOINT = Path(os.environ.get("CFG_TEST_CHECKPOINT", "model_store/fashion-mnist-cfg"))
EXTRA = '{"name": "apg s=5 r=1", "guidance_scale": 5, "method": {"kind": "apg", "norm_threshold": 1.0}}'


def test_methods_table_on_a_tiny_config(tmp_path, capsys):
    if not (CHECKPOINT / "manifest.json").is_file():
        pytest.fail(f"shipped checkpoint missing at {CHECKPOINT}; copy it there (or set CFG_TEST_CHECKPOINT)")
    # No --grid: it goes beside the report (img/<report>-grid.png), not over docs/img's.
    report, results_json = tmp_path / "guidance.md", tmp_path / "guidance.json"
    grid = tmp_path / "img" / "guidance-grid.png"
    # cfg s=1 is not chosen: it is drawn anyway, as the rows' reference.
    argv = ["--model", str(CHECKPOINT), "--only", "apg s=5", "--samplers", "dpmpp_2m", "--extra", EXTRA,
            "--per-class", "2", "--steps", "2", "--classifier-epochs", "1", "--classifier-train-images", "1000",
            "--classifier-cache", str(tmp_path / "clf.safetensors"),
            "--report", str(report), "--json", str(results_json)]  # fmt: skip
    main(argv)
    assert "classifier test accuracy" in capsys.readouterr().out

    results = json.loads(results_json.read_text())
    rows = results["results"]
    assert [(r["name"], r["sampler"]) for r in rows] == [
        ("cfg s=1", "dpmpp_2m"),
        ("apg s=5", "dpmpp_2m"),
        ("apg s=5 r=1", "dpmpp_2m"),
    ]
    assert results["real"]["n"] == 20 and results["per_class"] == 2 and results["steps"] == 2
    s1 = rows[0]
    assert s1["fid_vs_s1"] == 1.0 and s1["diversity_vs_s1"] == 1.0
    for r in rows:
        assert r["fid_vs_s1"] == pytest.approx(r["fid"] / s1["fid"])
        assert r["diversity_vs_s1"] == pytest.approx(r["diversity"] / s1["diversity"])
        assert 0 <= r["accuracy"] <= 1 and 0 < r["mean_pixel"] < 255 and len(r["accuracy_per_class"]) == 10
    assert rows[2]["setting"]["method"]["norm_threshold"] == 1.0
    assert rows[1]["setting"]["method"]["kind"] == "apg"
    assert rows[1]["fid"] != rows[2]["fid"]  # the norm threshold changed the images
    assert {"classifier", "sampling", "scoring", "total"} <= set(results["timings_s"])

    text = report.read_text()
    assert results["checkpoint_sha256"] in text and "python -m research.evaluation.methods --model" in text
    assert "| setting | sampler | accuracy | FID | FID / s=1 | diversity | diversity / s=1 | mean grey |" in text
    assert f"| `apg s=5 r=1` | dpmpp_2m | {rows[2]['accuracy']:.3f} | {rows[2]['fid']:.2f} |" in text
    assert "| real test images (n = 20) |" in text and "(n = 20 per setting)" in text
    assert "](img/guidance-grid.png)" in text

    with Image.open(grid) as image:
        assert image.format == "PNG"
        # labelled_grid at zoom 3: 10 columns and a row per table row of (28 + 2) * 3 px, 6 px of padding,
        # and a 19 px band of column labels (font 13) above.
        assert image.height == 19 + 6 + 3 * 90
        assert image.width > 6 + 10 * 90


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--per-class", "1"], "--per-class: must be between 2 and 500"),
        (["--only", "cfg s=3,cfg s=4"], "unknown setting(s) ['cfg s=4']"),
        (["--samplers", "ddim,plms"], "unknown sampler(s) ['plms']"),
        (["--only", "cfg s=2", "--samplers", "ddim"], "no setting is drawn with ddim"),
        (["--extra", '{"name": "x", "scale": 4}'], "--extra: setting 'x': unknown field 'scale'"),
        (["--extra", '{"name": "cfg s=3"}'], "extra setting name(s) ['cfg s=3'] already taken"),
    ],
)
def test_bad_arguments_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
