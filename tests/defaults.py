"""The shipped checkpoint's default step cache, read from its manifest (`default_cache`): what the API gives a
request to that model that names no `cache`, for tests that draw the same request with the sampler directly."""

import json

from app.config import DEFAULT_MODEL_PATH
from app.models import read_manifest
from app.sampling.cache import CACHE_PARAMS, SkipParams
from app.sampling.schedulers import config_key, schedule_values

_default = dict(read_manifest(DEFAULT_MODEL_PATH).default_cache or {"kind": "none"})
_kind = _default.pop("kind")
DEFAULT_CACHE = None if _kind == "none" else CACHE_PARAMS[_kind](**_default)


def skipped_steps(sampler: str, steps: int) -> frozenset[int]:
    """The steps a request that names no cache runs no row at (the default's `skip`, app/sampling/skip.py), at
    this sampler and step count: none where the default is another kind."""
    if not isinstance(DEFAULT_CACHE, SkipParams):
        return frozenset()
    config = json.loads((DEFAULT_MODEL_PATH / "scheduler" / "scheduler_config.json").read_text())
    _, sigmas = schedule_values(sampler, config_key(config), steps)
    return frozenset(i for i, full in enumerate(DEFAULT_CACHE.full_steps(sigmas)) if full != i)
