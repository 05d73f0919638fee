"""Run the service: python -m app.serve --host 127.0.0.1 --port 8000 (settings from CFG_* variables)."""

from __future__ import annotations

import argparse
import sys

import uvicorn
from pydantic import ValidationError

from app.config import Settings
from app.main import create_app
from app.models import CheckpointError


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    try:
        app = create_app(Settings())
    except ValidationError as exc:
        sys.exit(f"error: invalid CFG_* setting: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}")
    except CheckpointError as exc:
        sys.exit(f"error: {exc}")
    # One process owns the model and its batching loop: scale out with replicas, not workers.
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=None,
    )


if __name__ == "__main__":
    main()
