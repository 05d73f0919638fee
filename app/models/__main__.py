"""python -m app.models import SRC --name NAME [--store DIR] [--classes FILE] [--scheduler FILE]

Import a local diffusers folder into the model store (app/models/import_plan.py says what is accepted).
A refusal is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from app.models.importer import ImportRefused, import_model, read_classes_file

# The repository's model_store/, wherever the command runs from.
DEFAULT_STORE = Path(__file__).resolve().parent.parent.parent / "model_store"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m app.models", description=__doc__.splitlines()[2])
    commands = parser.add_subparsers(dest="command", required=True)
    imp = commands.add_parser("import", help="import a local diffusers folder (DiT pipeline or class-conditional UNet)")
    imp.add_argument("src", type=Path, help="a DiTPipeline folder, a UNet pipeline folder or a UNet2DModel folder")
    imp.add_argument("--name", required=True, help="the checkpoint's name: the folder written under --store")
    imp.add_argument("--store", type=Path, default=DEFAULT_STORE, help="model store folder (default: %(default)s)")
    imp.add_argument("--classes", type=Path, help="class names, one per line (default: id2label, else 'class N')")
    imp.add_argument(
        "--scheduler", type=Path, help="scheduler_config.json for a bare UNet folder (default: DDPMScheduler's)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        class_names = read_classes_file(args.classes) if args.classes else None
        dst, m = import_model(args.src, args.name, args.store, class_names, args.scheduler)
    except ImportRefused as exc:
        print(f"cannot import {args.src}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"cannot import {args.src}: {exc}", file=sys.stderr)
        return 1
    shape = "x".join(map(str, m.output_shape))
    latents = f", latents {'x'.join(map(str, m.sample_shape))}" if m.latent else ""
    classes = f"{m.num_classes} classes (null label {m.null_label})"
    print(f"imported {args.src} as {dst}: {m.kind}, {classes}, images {shape}{latents}")
    for note in m.source.get("notes", []):
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
