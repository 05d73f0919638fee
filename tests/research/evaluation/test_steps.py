import json
import os
from pathlib import Path

import pytest

from research.evaluation.steps import StepsResult, fewest_steps, main

pytestmark = pytest.mark.integration  # the shipped checkpoint

# The shipped checkpoint. CFG_TEST_CHECKPOINT points elsewhere only for local work before it is copied in.
CHECKPOINT = Path(os.environ.get("CFG_TEST_CHECKPOINT", "model_store/fashion-mnist-cfg"))


def result(sampler, steps, fid, precision="fp32"):
    return StepsResult(sampler, steps, precision, 0.9, fid, 0.0, 10.0, 70.0, [0.9] * 10)


def test_fewest_steps_within_the_tolerance_of_the_most_steps():
    results = [
        result("dpmpp_2m", 5, 30.0),
        result("dpmpp_2m", 10, 11.5),  # 1.15x: outside 10%
        result("dpmpp_2m", 15, 10.9),  # 1.09x: the fewest within
        result("dpmpp_2m", 20, 12.0),  # a noisy step count past it does not move the answer
        result("dpmpp_2m", 50, 10.0),
        result("ddim", 5, 40.0),
        result("ddim", 50, 20.0),
        result("ddim", 5, 10.0, "bf16"),
        result("ddim", 50, 10.0, "bf16"),
    ]
    fewest = {(f.sampler, f.precision): f for f in fewest_steps(results, 0.10)}
    assert (fewest["dpmpp_2m", "fp32"].steps, fewest["dpmpp_2m", "fp32"].fid) == (15, 10.9)
    assert fewest["dpmpp_2m", "fp32"].reference_steps == 50 and fewest["dpmpp_2m", "fp32"].reference_fid == 10.0
    assert fewest["ddim", "fp32"].steps is None and fewest["ddim", "fp32"].fid is None
    assert fewest["ddim", "bf16"].steps == 5  # each precision against its own most steps


def test_steps_table_on_a_tiny_config(tmp_path, capsys):
    if not (CHECKPOINT / "manifest.json").is_file():
        pytest.fail(f"shipped checkpoint missing at {CHECKPOINT}; copy it there (or set CFG_TEST_CHECKPOINT)")
    report, results_json = tmp_path / "steps.md", tmp_path / "steps.json"
    argv = ["--model", str(CHECKPOINT), "--samplers", "dpmpp_2m,ddim", "--steps", "3,2", "--precisions", "bf16",
            "--per-class", "2", "--classifier-epochs", "1", "--classifier-train-images", "1000",
            "--classifier-cache", str(tmp_path / "clf.safetensors"), "--report", str(report),
            "--json", str(results_json)]  # fmt: skip
    main(argv)
    assert "dpmpp_2m (fp32): fewest steps within 10% of 3 steps' FID" in capsys.readouterr().out

    table = json.loads(results_json.read_text())
    rows = table["results"]
    # fp32 is always drawn: the other precisions are compared with it at the same seeds.
    assert [(r["precision"], r["sampler"], r["steps"]) for r in rows] == [
        (p, s, n) for p in ("fp32", "bf16") for s in ("dpmpp_2m", "ddim") for n in (2, 3)
    ]
    assert table["real"]["n"] == 20 and table["per_class"] == 2 and '"sigma_max": 5.0' in table["guidance"]
    for r in rows:
        most = next(x for x in rows if (x["sampler"], x["precision"], x["steps"]) == (r["sampler"], r["precision"], 3))
        assert r["fid_vs_most"] == pytest.approx(r["fid"] / most["fid"])
        assert 0 <= r["accuracy"] <= 1 and 0 < r["mean_pixel"] < 255
    assert len(table["fewest"]) == 4 and {"sampling fp32", "sampling bf16", "total"} <= set(table["timings_s"])

    text = report.read_text()
    assert "python -m research.evaluation.steps --model" in text and table["checkpoint_sha256"] in text
    assert "## FID (fp32)" in text and "## Accuracy (bf16)" in text and "## Precisions at the same seeds" in text
    assert "| steps | dpmpp_2m | ddim |" in text
    fid_2 = {r["sampler"]: r["fid"] for r in rows if r["steps"] == 2 and r["precision"] == "fp32"}
    assert f"| 2 | {fid_2['dpmpp_2m']:.2f} | {fid_2['ddim']:.2f} |" in text
    assert "n = 20 images per cell" in text and "| real test images" not in text


def test_fp16_on_the_cpu_is_refused_before_anything_runs(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--precisions", "fp16", "--device", "cpu"])
    assert exit_info.value.code == 2
    assert "fp16 needs a CUDA device" in capsys.readouterr().err
