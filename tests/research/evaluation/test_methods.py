import json
import os
from pathlib import Path

import pytest
from PIL import Image

from research.evaluation.methods import main

pytestmark = pytest.mark.integration  # the shipped checkpoint

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
            "--report", str(report), "--json", str(results_json), "--title", "APG against CFG here"]  # fmt: skip
    main(argv)
    assert report.read_text().startswith("# APG against CFG here\n")  # --title heads the page
    out = capsys.readouterr().out
    assert "judge 1: small CNN test accuracy" in out and "judge 2: ResNet test accuracy" in out

    results = json.loads(results_json.read_text())
    rows = results["results"]
    assert [(r["name"], r["sampler"]) for r in rows] == [
        ("cfg s=1", "dpmpp_2m"),
        ("apg s=5", "dpmpp_2m"),
        ("apg s=5 r=1", "dpmpp_2m"),
    ]
    assert results["real"]["n"] == 20 and results["per_class"] == 2 and results["steps"] == 2
    assert results["manifold_reference_size"] == 20 and results["reference_size"] == 10000 - 20
    # The committed ResNet, not one trained here: its recorded test accuracy is what it scores now.
    committed = json.loads(Path("research/evaluation/judges/resnet-fmnist/manifest.json").read_text())
    assert results["judges"]["resnet"]["test_accuracy"] == pytest.approx(committed["test_accuracy"], abs=1e-4)
    assert set(results["judges"]) == {"cnn", "resnet"}
    for judge in ("cnn", "resnet"):
        s1 = rows[0]["judges"][judge]
        assert s1["fid_vs_s1"] == 1.0 and s1["diversity_vs_s1"] == 1.0
        for r in rows:
            m = r["judges"][judge]
            assert m["fid_vs_s1"] == pytest.approx(m["fid"] / s1["fid"])
            assert m["diversity_vs_s1"] == pytest.approx(m["diversity"] / s1["diversity"])
            assert 0 <= m["accuracy"] <= 1 and len(m["accuracy_per_class"]) == 10
            assert all(0 <= m[k] <= 1 for k in ("precision", "recall", "coverage")) and m["density"] >= 0
        assert (
            rows[1]["judges"][judge]["fid"] != rows[2]["judges"][judge]["fid"]
        )  # the norm threshold changed the images
    # The two judges see the same images through different features.
    assert rows[1]["judges"]["cnn"]["fid"] != rows[1]["judges"]["resnet"]["fid"]
    assert all(0 < r["mean_pixel"] < 255 for r in rows)
    assert rows[2]["setting"]["method"]["norm_threshold"] == 1.0
    assert rows[1]["setting"]["method"]["kind"] == "apg"
    assert {"judges", "sampling", "scoring", "total"} <= set(results["timings_s"])

    text = report.read_text()
    assert results["checkpoint_sha256"] in text and "python -m research.evaluation.methods --model" in text
    assert "## Under judge 1: small CNN" in text and "## Under judge 2: ResNet" in text
    header = (
        "| setting | sampler | accuracy | FID | FID / s=1 | diversity | diversity / s=1 | precision | recall | "
        "density | coverage | mean grey |"
    )
    assert text.count(header) == 2
    cnn_part, resnet_part = text.split("## Under judge 2: ResNet")
    for judge, part in (("cnn", cnn_part), ("resnet", resnet_part)):
        m = rows[2]["judges"][judge]
        assert f"| `apg s=5 r=1` | dpmpp_2m | {m['accuracy']:.3f} | {m['fid']:.2f} |" in part
        assert f"| {m['precision']:.3f} | {m['recall']:.3f} | {m['density']:.3f} | {m['coverage']:.3f} |" in part
    assert text.count("| real test images (n = 20) |") == 2 and "(n = 20 per setting)" in text
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


def test_the_table_draws_at_the_precision_asked_and_says_so(tmp_path):
    """--precision builds the model's forward as the service's CFG_PRECISION does (research.evaluation.steps'
    precision_forward): bf16 here (autocast; int8's calibration and compilation are tests/models/test_quantize.py's),
    whose images differ from fp32's at the same seeds; the JSON and the report's header name it."""
    from app.models import load_checkpoint
    from research.evaluation.methods import draw_rows
    from research.evaluation.settings import choose_settings, table_rows
    from research.evaluation.steps import precision_forward

    model = load_checkpoint(CHECKPOINT, "cpu")
    rows = table_rows(choose_settings(["cfg s=3"], []), ("dpmpp_2m",))
    fp32 = draw_rows(model, rows, 2, 3, 0, 64)
    bf16 = draw_rows(model, rows, 2, 3, 0, 64, forward=precision_forward(model, "bf16", 64))
    assert [a.shape for a in fp32] == [b.shape for b in bf16]
    assert any((a != b).any() for a, b in zip(fp32, bf16, strict=True))

    report, results_json = tmp_path / "p.md", tmp_path / "p.json"
    argv = ["--model", str(CHECKPOINT), "--only", "cfg s=3", "--samplers", "dpmpp_2m", "--precision", "bf16",
            "--per-class", "2", "--steps", "2", "--classifier-epochs", "1", "--classifier-train-images", "1000",
            "--classifier-cache", str(tmp_path / "clf.safetensors"),
            "--report", str(report), "--json", str(results_json)]  # fmt: skip
    main(argv)
    assert json.loads(results_json.read_text())["precision"] == "bf16"
    assert "the model's forward at **bf16**" in report.read_text()


def test_a_precision_the_device_lacks_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--precision", "fp16", "--device", "cpu"])
    assert exc.value.code == 2
    assert "argument --precision:" in capsys.readouterr().err
