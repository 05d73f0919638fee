"""Draw samples from a checkpoint and write a PNG, without the server.

  python -m research.generate --class Sneaker --num-images 16 --scale 3 --out sneakers.png
  python -m research.generate --sweep --scales 0,1,2,3,5,7.5 --out sweep.png
  python -m research.generate --class Shirt --method autoguidance --autoguidance-guide fashion-mnist-guide \
      --guide model_store/fashion-mnist-guide --out shirts.png

Image i uses seed --seed + i, so an image is the same whatever it is batched with.
The sweep draws --num-images (default 1) per class at each of --scales, with the other guidance
options as given; a row keeps its seeds across the scales.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pydantic import ValidationError
from pydantic.fields import FieldInfo
from tqdm import tqdm

from app.guidance import NOISE_SCHEDULE_KINDS, Cads, GuidanceMethod, GuidanceSchedule, MethodParams, method_models
from app.images import labelled_grid, make_grid, to_pil, upscale
from app.models import CheckpointError, LoadedModel, guide_mismatch, load_checkpoint, model_denoiser, unet_denoiser
from app.sampling import (
    DEFAULT_GUIDANCE,
    DEFAULT_SAMPLER,
    SAMPLERS,
    Denoiser,
    GuidanceParams,
    SampleRun,
    SampleSpec,
    sample,
)

DEFAULT_MODEL = Path("model_store/fashion-mnist-cfg")
DEFAULT_SCALES = (0.0, 1.0, 2.0, 3.0, 5.0, 7.5)
DEFAULT_MAX_ROWS = 128
SCHEDULE_KINDS = ("constant", "linear", "cosine", "interval")


# ---- library: specs -> images --------------------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    """Part of one spec's seeds, small enough to share a forward pass with other chunks."""

    spec_index: int
    spec: SampleSpec


def rows_per_image(spec: SampleSpec) -> int:
    """Model rows an image of this spec takes at its busiest step: 2 where any step is guided, else 1."""
    if spec.class_label is None:
        return 1
    g = spec.guidance
    return 2 if any(s != 1.0 for s in g.schedule.scales(g.guidance_scale, spec.steps)) else 1


def plan_batches(specs: Sequence[SampleSpec], max_rows: int = DEFAULT_MAX_ROWS) -> list[list[Chunk]]:
    """Split specs into chunks that fit max_rows model rows, and pack the chunks in order into batches
    of at most max_rows rows, so that each batch is one forward per step."""
    batches: list[list[Chunk]] = [[]]
    rows = 0
    for index, spec in enumerate(specs):
        width = rows_per_image(spec)
        per_chunk = max(1, max_rows // width)
        for start in range(0, spec.num_images, per_chunk):
            chunk = Chunk(index, replace(spec, seeds=spec.seeds[start : start + per_chunk]))
            if rows + width * chunk.spec.num_images > max_rows and batches[-1]:
                batches.append([])
                rows = 0
            batches[-1].append(chunk)
            rows += width * chunk.spec.num_images
    return [b for b in batches if b]


def load_guides(main: LoadedModel, paths: Sequence[Path]) -> dict[str, Denoiser]:
    """The guide checkpoints at paths (autoguidance), loaded beside main, by name; ValueError for one that
    cannot guide main (app.models.guide_mismatch)."""
    guides: dict[str, Denoiser] = {}
    for path in paths:
        guide = load_checkpoint(path, main.device)
        if (why_not := guide_mismatch(main, guide)) is not None:
            raise ValueError(f"{guide.manifest.name} cannot guide {main.manifest.name}: {why_not}")
        guides[guide.manifest.name] = unet_denoiser(guide.unet)
    return guides


def total_steps(specs: Sequence[SampleSpec], max_rows: int = DEFAULT_MAX_ROWS) -> int:
    """The number of forward passes generate() makes: one per step of each batch's longest run."""
    return sum(max(c.spec.steps for c in batch) for batch in plan_batches(specs, max_rows))


def generate(
    model: LoadedModel,
    specs: Sequence[SampleSpec],
    max_rows: int = DEFAULT_MAX_ROWS,
    on_step: Callable[[], None] | None = None,
    forward: Denoiser | None = None,
    guides: Mapping[str, Denoiser] | None = None,
) -> list[np.ndarray]:
    """The images of each spec, uint8 (N, H, W, C), in spec order: the one function the research tools draw
    with. on_step is called after each forward; forward replaces the model's fp32 forward (another precision);
    guides are the guide models autoguidance specs name, by name (load_guides)."""
    denoiser = model_denoiser(model)  # the UNet's, or a pixel-space DiT's (research.train --arch dit)
    m = model.manifest
    image_shape = (m.in_channels, m.image_size, m.image_size)
    parts: list[list[np.ndarray]] = [[] for _ in specs]
    for batch in plan_batches(specs, max_rows):
        runs = [
            SampleRun(c.spec, model.scheduler_config, image_shape, m.null_label, model.device, denoiser.class_embedding)
            for c in batch
        ]
        sample(forward or denoiser, runs, on_step, guides)
        for chunk, run in zip(batch, runs, strict=True):
            parts[chunk.spec_index].append(run.images())
    return [np.concatenate(p) for p in parts]


def sweep_specs(
    class_labels: Sequence[int],
    guidance_scales: Sequence[float],
    seed: int,
    per_class: int = 1,
    steps: int = 20,
    sampler: str = "ddim",
    guidance: GuidanceParams | None = None,
) -> list[SampleSpec]:
    """One spec per (class, scale), class-major; class c uses seeds seed + c * per_class + i at every scale.

    guidance gives everything but the scale. Where every step's scale is 0 and there is no rescale,
    the guided eps is eps_uncond exactly, so those specs are drawn unconditionally (half the rows).
    """
    guidance = guidance or GuidanceParams()
    specs = []
    for c in class_labels:
        seeds = tuple(seed + c * per_class + i for i in range(per_class))
        for s in guidance_scales:
            g = replace(guidance, guidance_scale=s)
            unconditional = g.guidance_rescale == 0 and not any(g.schedule.scales(s, steps))
            specs.append(SampleSpec(None if unconditional else c, seeds, steps, sampler, g))
    return specs


def sweep_image(
    images: Sequence[np.ndarray],
    class_names: Sequence[str],
    guidance_scales: Sequence[float],
    zoom: int = 3,
    max_per_class: int | None = None,
) -> Image.Image:
    """The labelled grid of generate(sweep_specs(...)): a row per class and sample, a column per scale.

    max_per_class shows only the first samples of each class.
    """
    per_class = min(images[0].shape[0], max_per_class or images[0].shape[0])
    ncols = len(guidance_scales)
    cells: list[np.ndarray] = []
    row_labels: list[str] = []
    for r, name in enumerate(class_names):
        row = images[r * ncols : (r + 1) * ncols]
        for i in range(per_class):
            cells.extend(cell[i] for cell in row)
            row_labels.append(name if i == 0 else "")
    col_labels = [f"s={s:g}" for s in guidance_scales]
    return labelled_grid(np.stack(cells), ncols, row_labels, col_labels, zoom=zoom)


# ---- command line ----------------------------------------------------------------------------------


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value:g}")
    return value


def unit_float(text: str) -> float:
    value = finite_float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value:g}")
    return value


def method_fields() -> list[tuple[str, str, FieldInfo]]:
    """(kind, field name, field) of every registered guidance method's settings but its kind: a flag each."""
    return [
        (model.model_fields["kind"].default, name, field)
        for model in method_models()
        for name, field in model.model_fields.items()
        if name != "kind"
    ]


def field_type(field: FieldInfo) -> Callable[[str], object]:
    """A method field's argparse type: a float field's number checked against its ge/le bounds here (a usage
    error naming them); other fields' text goes to the method's model, which validates it."""
    if field.annotation is not float:
        return str
    low = next((m.ge for m in field.metadata if hasattr(m, "ge")), None)
    high = next((m.le for m in field.metadata if hasattr(m, "le")), None)

    def parse(text: str) -> float:
        value = finite_float(text)
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f"between {low:g} and {high:g}" if low is not None and high is not None else None
            bounds = bounds or (f"{low:g} or more" if low is not None else f"{high:g} or less")
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {value:g}")
        return value

    return parse


def scale_list(text: str) -> tuple[float, ...]:
    """'0,1,2.5' -> (0.0, 1.0, 2.5); every scale finite and >= 0."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError("expected comma-separated guidance scales, e.g. 0,1,3")
    return tuple(non_negative_float(p) for p in parts)


def _name_key(name: str) -> str:
    return re.sub(r"[\s_\-]", "", name.lower())


def resolve_class(text: str, class_names: Sequence[str]) -> int:
    """A class index from its name (case-insensitive; 'T-shirt/top', 't-shirt', 'top' all match) or index."""
    if text.strip().lstrip("-").isdigit():
        index = int(text)
        if 0 <= index < len(class_names):
            return index
        raise ValueError(f"class index {index} is out of range 0..{len(class_names) - 1}")
    key = _name_key(text)
    for index, name in enumerate(class_names):
        if key == _name_key(name) or key in (_name_key(alias) for alias in name.split("/")):
            return index
    raise ValueError(f"unknown class {text!r}; choose one of {', '.join(class_names)} (or an index)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cfg-generate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="checkpoint folder (default: %(default)s)")
    p.add_argument(
        "--class", dest="class_name", default=None, help="class name or index; omit for unconditional samples"
    )
    p.add_argument(
        "--num-images",
        type=positive_int,
        default=None,
        help="images (default 16), or per class with --sweep (default 1)",
    )
    p.add_argument("--steps", type=positive_int, default=20)
    p.add_argument("--sampler", choices=sorted(SAMPLERS), default=DEFAULT_SAMPLER)
    p.add_argument("--seed", type=int, default=0, help="image i uses seed SEED + i")
    g = p.add_argument_group(
        "guidance (each left out takes the service's default request, app.sampling.DEFAULT_GUIDANCE)"
    )
    g.add_argument("--scale", type=non_negative_float, default=None, help="guidance scale s (1: no guidance)")
    kinds = [m.model_fields["kind"].default for m in method_models()]
    g.add_argument("--method", choices=kinds, default=None, help="how eps_cond and eps_uncond combine")
    for kind, name, field in method_fields():  # --apg-eta, --apg-momentum, --apg-norm-threshold, ...
        flag = f"--{kind}-{name}".replace("_", "-")
        help_text = f"{kind}: {field.description}".replace("%", "%%")
        g.add_argument(flag, dest=f"{kind}_{name}", type=field_type(field), default=None, help=help_text)
    g.add_argument("--schedule", choices=SCHEDULE_KINDS, default=None, help="guidance weight schedule")
    g.add_argument(
        "--schedule-start",
        type=finite_float,
        default=None,
        help="schedule start (default 0 for interval, else 1); see app/guidance/",
    )
    g.add_argument("--schedule-end", type=finite_float, default=None, help="schedule end (default 1)")
    g.add_argument("--sigma-min", type=non_negative_float, default=None, help="interval: no guidance at sigma <= this")
    g.add_argument("--sigma-max", type=non_negative_float, default=None, help="interval: no guidance at sigma > this")
    g.add_argument("--noise-level", type=non_negative_float, default=None, help="noise added to eps_cond")
    g.add_argument("--noise-schedule", choices=NOISE_SCHEDULE_KINDS, default=None, help="noise_level per step")
    g.add_argument("--rescale", type=unit_float, default=None, help="guidance rescale phi (Lin et al. 2023)")
    g.add_argument("--cads", action=argparse.BooleanOptionalAction, default=None, help="CADS with its defaults")
    p.add_argument("--ncols", type=positive_int, default=None, help="grid columns (default: about sqrt(N))")
    p.add_argument("--zoom", type=positive_int, default=None, help="pixel enlargement (default 1, sweep 3)")
    p.add_argument("--out", type=Path, default=None, help="PNG path (default samples.png, sweep.png)")
    p.add_argument("--sweep", action="store_true", help="one grid: rows are classes, columns guidance scales")
    p.add_argument("--scales", type=scale_list, default=DEFAULT_SCALES, help="sweep scales (default 0,1,2,3,5,7.5)")
    p.add_argument("--max-rows", type=positive_int, default=DEFAULT_MAX_ROWS, help="model rows per forward")
    add_guide_argument(p)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def add_guide_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--guide",
        type=Path,
        action="append",
        default=[],
        help="a guide checkpoint folder for autoguidance, named by its manifest's name in --autoguidance-guide "
        "(repeatable)",
    )


def method_from_args(args: argparse.Namespace, default: MethodParams) -> MethodParams:
    """--method's settings (default's kind without it) with its own flags; a flag of another method is an
    error (ValueError), as is a value its model refuses (pydantic's ValidationError), a required field left
    out included (autoguidance's --autoguidance-guide)."""
    same = args.method is None or args.method == default.kind
    kind = default.kind if same else args.method
    given = {(k, name): getattr(args, f"{k}_{name}") for k, name, _ in method_fields()}
    given = {key: value for key, value in given.items() if value is not None}
    foreign = [f"--{k}-{name}".replace("_", "-") for k, name in given if k != kind]
    if foreign:
        raise ValueError(f"{', '.join(foreign)} set another method's field; the method is {kind} (--method)")
    if same and not given:
        return default
    base = default.model_dump() if same else {"kind": kind}
    return GuidanceMethod(**{**base, **{name: value for (_, name), value in given.items()}})


def guidance_from_args(args: argparse.Namespace) -> GuidanceParams:
    """The service's default guidance with what the flags set."""
    base = DEFAULT_GUIDANCE
    schedule = base.schedule
    schedule_flags = (args.schedule_start, args.schedule_end, args.sigma_min, args.sigma_max)
    if args.schedule is not None or any(v is not None for v in schedule_flags):
        kind = args.schedule or schedule.kind
        start = args.schedule_start if args.schedule_start is not None else (0.0 if kind == "interval" else 1.0)
        end = args.schedule_end if args.schedule_end is not None else 1.0
        schedule = GuidanceSchedule(kind=kind, start=start, end=end, sigma_min=args.sigma_min, sigma_max=args.sigma_max)
    method = method_from_args(args, base.method)
    cads = base.cads if args.cads is None else (Cads() if args.cads else None)

    def pick(value, default):
        return default if value is None else value

    return GuidanceParams(
        guidance_scale=pick(args.scale, base.guidance_scale),
        schedule=schedule,
        noise_level=pick(args.noise_level, base.noise_level),
        noise_schedule=pick(args.noise_schedule, base.noise_schedule),
        guidance_rescale=pick(args.rescale, base.guidance_rescale),
        method=method,
        cads=cads,
    )


def run_with_progress(
    model: LoadedModel, specs: list[SampleSpec], max_rows: int, guides: Mapping[str, Denoiser] | None = None
) -> list[np.ndarray]:
    with tqdm(total=total_steps(specs, max_rows), desc="sampling", unit="step", dynamic_ncols=True) as bar:
        return generate(model, specs, max_rows, on_step=bar.update, guides=guides)


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        model = load_checkpoint(args.model, args.device)
        guides = load_guides(model, args.guide)
    except (CheckpointError, ValueError) as exc:
        sys.exit(f"error: {exc}")
    try:
        method = method_from_args(args, DEFAULT_GUIDANCE.method)
    except (ValueError, ValidationError) as exc:
        parser.error(str(exc))
    guide = getattr(method, "guide", None)
    if guide is not None and guide not in guides:
        parser.error(f"the method's guide {guide!r} is not loaded: give its checkpoint folder with --guide")
    class_names = model.manifest.class_names
    try:
        class_label = None if args.class_name is None else resolve_class(args.class_name, class_names)
    except ValueError as exc:
        parser.error(f"argument --class: {exc}")

    if args.sweep:
        labels = list(range(len(class_names))) if class_label is None else [class_label]
        per_class = args.num_images or 1
        guidance = guidance_from_args(args)
        specs = sweep_specs(labels, args.scales, args.seed, per_class, args.steps, args.sampler, guidance)
        images = run_with_progress(model, specs, args.max_rows, guides)
        picture = sweep_image(images, [class_names[c] for c in labels], args.scales, zoom=args.zoom or 3)
        out = args.out or Path("sweep.png")
    else:
        seeds = tuple(args.seed + i for i in range(args.num_images or 16))
        spec = SampleSpec(class_label, seeds, args.steps, args.sampler, guidance_from_args(args))
        (drawn,) = run_with_progress(model, [spec], args.max_rows, guides)
        if len(drawn) == 1:
            grid = drawn[0]
        else:
            grid = make_grid(drawn, args.ncols or math.ceil(math.sqrt(len(drawn))))
        zoom = args.zoom or 1
        picture = to_pil(upscale(grid, zoom))
        out = args.out or Path("samples.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    picture.save(out, format="PNG")
    print(f"wrote {out} ({picture.width}x{picture.height})")


if __name__ == "__main__":
    main()
