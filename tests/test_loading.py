"""app.loading.default_cache: a checkpoint's default step cache (its manifest's default_cache) is served only where
the model runs it, with settings in range; anything else fails the startup naming why (pure: no model)."""

from dataclasses import replace

import pytest

from app.config import DEFAULT_MODEL_PATH
from app.loading import cache_entry, default_cache
from app.models import read_manifest

MANIFEST = read_manifest(DEFAULT_MODEL_PATH)
UNET = cache_entry({"deepcache": None, "first_block": "a DiT's"}, max_branch=2)
INT8 = cache_entry({"deepcache": "int8 runs a quantized graph", "first_block": "a DiT's"})


def test_the_shipped_checkpoint_names_the_cache_measured_for_it():
    assert default_cache(MANIFEST, UNET) == {"kind": "skip", "interval": 5, "uncond_every": 3}
    assert default_cache(MANIFEST, INT8) == default_cache(MANIFEST, UNET)  # skip runs at any precision


def test_a_manifest_without_one_defaults_to_none():
    assert default_cache(replace(MANIFEST, default_cache=None), UNET) == {"kind": "none"}


@pytest.mark.parametrize(
    ("chosen", "entry", "message"),
    [
        ({"kind": "deepcache", "interval": 3}, INT8, "default_cache is deepcache, which it can't run: int8 runs"),
        ({"kind": "first_block"}, UNET, "default_cache is first_block, which it can't run: a DiT's"),
        ({"kind": "teacache"}, UNET, "default_cache is teacache, which it can't run: no such step cache"),
        ({"kind": "uncond", "every": 0}, UNET, "default_cache is refused: uncond every must be at least 1"),
        ({"kind": "uncond", "speed": 2}, UNET, "default_cache is refused: .*unexpected keyword argument 'speed'"),
        # past the API's ranges, or the model's deepest branch: every request without a cache would fail on it
        ({"kind": "uncond", "every": 11}, UNET, "default_cache is refused: .*less than or equal to 10"),
        ({"kind": "deepcache", "branch": 7}, UNET, "default_cache is refused: cache.branch must be 0..2"),
    ],
)
def test_a_default_the_model_cannot_run_fails_the_startup_naming_why(chosen, entry, message):
    with pytest.raises(RuntimeError, match=message):
        default_cache(replace(MANIFEST, default_cache=chosen), entry)


def test_each_cache_kind_the_model_runs_lists_its_settings_for_a_form():
    # GET /v1/models' cache.fields (the playground builds its inputs from them): the API schema's fields, their
    # defaults and bounds, deepcache's branch bounded by the model's deepest rather than the schema's 8
    assert set(UNET["fields"]) == {"none", "deepcache", "uncond", "skip"} and UNET["fields"]["none"] == []
    uncond = {f["name"]: f for f in UNET["fields"]["uncond"]}
    assert uncond["every"] == {**uncond["every"], "type": "integer", "default": 3, "minimum": 1, "maximum": 10}
    assert uncond["order"]["default"] == 1 and uncond["order"]["maximum"] == 1
    deep = {f["name"]: f for f in UNET["fields"]["deepcache"]}
    assert deep["branch"]["maximum"] == 2 and deep["interval"]["default"] == 3
    assert deep["full_sigma_max"]["nullable"] and deep["full_sigma_max"]["default"] is None
    assert "kind" not in deep and set(INT8["fields"]) == {"none", "uncond", "skip"}
