import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.guidance import Cads, GuidanceMethod, GuidanceSchedule
from app.images import GRID_PADDING
from app.sampling import DEFAULT_GUIDANCE, GuidanceParams, SampleSpec
from research.data import CLASS_NAMES
from research.generate import (
    build_parser,
    guidance_from_args,
    main,
    plan_batches,
    resolve_class,
    rows_per_image,
    sweep_specs,
)

pytestmark = pytest.mark.integration  # the shipped checkpoint

# The shipped checkpoint. CFG_TEST_CHECKPOINT points elsewhere only for local work before it is copied in.
CHECKPOINT = Path(os.environ.get("CFG_TEST_CHECKPOINT", "model_store/fashion-mnist-cfg"))


@pytest.fixture(scope="module")
def checkpoint() -> Path:
    if not (CHECKPOINT / "manifest.json").is_file():
        pytest.fail(f"shipped checkpoint missing at {CHECKPOINT}; copy it there (or set CFG_TEST_CHECKPOINT)")
    return CHECKPOINT


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image)


def test_writes_a_grid_png(checkpoint, tmp_path, capsys):
    out = tmp_path / "sneakers.png"
    main(["--model", str(checkpoint), "--class", "sneaker", "--num-images", "6", "--ncols", "3"]
         + ["--steps", "3", "--out", str(out)])  # fmt: skip
    pixels = read_png(out)
    p = GRID_PADDING
    assert pixels.shape == (2 * (28 + p) + p, 3 * (28 + p) + p)
    assert "wrote" in capsys.readouterr().out


def test_one_image_is_28_pixels_times_zoom(checkpoint, tmp_path):
    out = tmp_path / "one.png"
    main(["--model", str(checkpoint), "--num-images", "1", "--steps", "2", "--zoom", "2", "--out", str(out)])
    assert read_png(out).shape == (56, 56)


def test_sweep_grid_has_a_cell_per_class_and_scale(checkpoint, tmp_path):
    """Each cell of the sweep is the image the plain command draws for that class, scale and seed."""
    sweep, zoom, steps = tmp_path / "sweep.png", 2, "2"
    main(["--model", str(checkpoint), "--sweep", "--scales", "0,1,3", "--steps", steps, "--zoom", str(zoom),
          "--seed", "10", "--out", str(sweep)])  # fmt: skip
    pixels = read_png(sweep)
    cell, p = 28 + GRID_PADDING, GRID_PADDING
    grid_h, grid_w = (len(CLASS_NAMES) * cell + p) * zoom, (3 * cell + p) * zoom
    assert pixels.shape[0] > grid_h and pixels.shape[1] > grid_w  # plus the label margins
    assert pixels.shape[0] - grid_h < 60 and pixels.shape[1] - grid_w < 150
    grid = pixels[-grid_h:, -grid_w:][::zoom, ::zoom]

    # Sneaker (class 7) at s=3: seed 10 + 7 in the sweep.
    single = tmp_path / "single.png"
    main(["--model", str(checkpoint), "--class", "7", "--scale", "3", "--seed", "17", "--num-images", "1",
          "--steps", steps, "--out", str(single)])  # fmt: skip
    row, col = 7, 2
    top, left = p + row * cell, p + col * cell
    in_sweep = grid[top : top + 28, left : left + 28].astype(int)
    # Batch composition changes float round-off, so allow a grey level or two.
    assert np.abs(in_sweep - read_png(single).astype(int)).max() <= 2


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--class", "Socks"], "unknown class 'Socks'"),
        (["--class", "10"], "out of range"),
        (["--num-images", "0"], "must be at least 1"),
        (["--scale", "-1"], "must be 0 or more"),
        (["--scale", "nan"], "finite"),
        (["--rescale", "2"], "between 0 and 1"),
        (["--sampler", "plms"], "invalid choice"),
        (["--sweep", "--scales", "1,,x"], "expected a number"),
        (["--method", "sag"], "invalid choice"),
        (["--noise-schedule", "cosine"], "invalid choice"),
        (["--apg-norm-threshold", "-1"], "must be between 0 and 1000"),
        (["--apg-eta", "2"], "must be between 0 and 1"),  # the bounds ApgMethod declares
        (["--apg-eta", "0.5"], "--apg-eta set another method's field; the method is cfg"),
        (["--method", "autoguidance"], "guide\n  Field required"),
        (["--method", "autoguidance", "--autoguidance-guide", "g"], "guide 'g' is not loaded: give its checkpoint"),
    ],
)
def test_bad_arguments_are_usage_errors(checkpoint, argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--model", str(checkpoint), *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["--model", str(tmp_path / "nowhere")])
    assert "checkpoint folder missing" in str(exc.value.code)


@pytest.mark.parametrize(
    "text, index",
    [("Sneaker", 7), ("sneaker", 7), ("7", 7), ("0", 0), ("t-shirt", 0), ("T-shirt/top", 0), ("top", 0),
     ("ankle boot", 9), ("Ankle-Boot", 9)],
)  # fmt: skip
def test_resolve_class(text, index):
    assert resolve_class(text, CLASS_NAMES) == index


def test_plan_batches_splits_and_packs_within_max_rows():
    guided = SampleSpec(class_label=1, seeds=tuple(range(100)), guidance=GuidanceParams(guidance_scale=3.0))
    unguided = SampleSpec(class_label=2, seeds=tuple(range(40)), guidance=GuidanceParams(guidance_scale=1.0))
    uncond = SampleSpec(class_label=None, seeds=tuple(range(30)))
    assert [rows_per_image(s) for s in (guided, unguided, uncond)] == [2, 1, 1]
    batches = plan_batches([guided, unguided, uncond], max_rows=64)
    for batch in batches:
        assert sum(rows_per_image(c.spec) * c.spec.num_images for c in batch) <= 64
    # Every seed of every spec is drawn once, in order.
    for index, spec in enumerate([guided, unguided, uncond]):
        seeds = [s for batch in batches for c in batch if c.spec_index == index for s in c.spec.seeds]
        assert tuple(seeds) == spec.seeds


def test_sweep_specs_share_seeds_across_scales_and_draw_s0_unconditionally():
    specs = sweep_specs([0, 1], [0.0, 3.0], seed=5, per_class=2)
    assert [(s.class_label, s.guidance.guidance_scale, s.seeds) for s in specs] == [
        (None, 0.0, (5, 6)),
        (0, 3.0, (5, 6)),
        (None, 0.0, (7, 8)),
        (1, 3.0, (7, 8)),
    ]


def test_sweep_specs_keep_the_class_where_s0_is_not_the_unconditional_model():
    # Outside an interval schedule's window the scale is 1 (conditional), so s=0 is not unconditional.
    window = GuidanceParams(schedule=GuidanceSchedule("interval", start=0.5, end=1.0))
    rescaled = GuidanceParams(guidance_rescale=0.7)
    for guidance in (window, rescaled):
        (spec,) = sweep_specs([4], [0.0], seed=0, guidance=guidance)
        assert spec.class_label == 4 and spec.guidance.guidance_scale == 0.0


def test_generate_calls_on_step_once_per_forward_and_matches_total_steps(checkpoint):
    from app.models import load_checkpoint
    from research.generate import generate, total_steps

    specs = [SampleSpec(class_label=c, seeds=tuple(range(5)), steps=s) for c, s in ((0, 3), (1, 2))]
    calls = []
    images = generate(load_checkpoint(checkpoint), specs, max_rows=8, on_step=lambda: calls.append(1))
    # 8 rows hold 4 guided images: batches [0: 4 images], [0: 1], [1: 4], [1: 1], of 3, 3, 2 and 2 steps
    assert len(calls) == total_steps(specs, max_rows=8) == 3 + 3 + 2 + 2
    assert [im.shape for im in images] == [(5, 28, 28, 1), (5, 28, 28, 1)]


def test_guidance_flags_default_to_the_services_default_request():
    assert guidance_from_args(build_parser().parse_args([])) == DEFAULT_GUIDANCE


def test_guidance_flags_set_every_option():
    argv = ["--scale", "4", "--method", "apg", "--apg-norm-threshold", "2", "--apg-momentum", "0", "--schedule",
            "interval", "--sigma-min", "0.3", "--sigma-max", "5", "--noise-level", "0.2", "--noise-schedule", "sigma",
            "--rescale", "0.5", "--cads"]  # fmt: skip
    assert guidance_from_args(build_parser().parse_args(argv)) == GuidanceParams(
        guidance_scale=4.0,
        schedule=GuidanceSchedule("interval", 0.0, 1.0, sigma_min=0.3, sigma_max=5.0),
        noise_level=0.2,
        noise_schedule="sigma",
        guidance_rescale=0.5,
        method=GuidanceMethod("apg", momentum=0.0, norm_threshold=2.0),  # eta: ApgMethod's default
        cads=Cads(),
    )
    argv = ["--method", "autoguidance", "--autoguidance-guide", "g", "--autoguidance-scale", "1.5",
            "--autoguidance-cfg", "true"]  # fmt: skip
    auto = guidance_from_args(build_parser().parse_args(argv)).method
    assert auto == GuidanceMethod("autoguidance", guide="g", scale=1.5, cfg=True)
    plain = guidance_from_args(build_parser().parse_args(["--method", "cfg", "--no-cads", "--schedule", "constant"]))
    assert plain.method == GuidanceMethod("cfg") and plain.cads is None and plain.schedule.kind == "constant"
