"""The shipped checkpoint's default step cache, read from its manifest (`default_cache`): what the API gives a
request to that model that names no `cache`, for tests that draw the same request with the sampler directly."""

from app.config import DEFAULT_MODEL_PATH
from app.models import read_manifest
from app.sampling.cache import CACHE_PARAMS

_default = dict(read_manifest(DEFAULT_MODEL_PATH).default_cache or {"kind": "none"})
_kind = _default.pop("kind")
DEFAULT_CACHE = None if _kind == "none" else CACHE_PARAMS[_kind](**_default)
