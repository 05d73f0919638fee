"""app.sampling.schedulers' caches: the key of a scheduler config, kept per dict object while it is unchanged."""

import copy

import pytest

from app.sampling.schedulers import config_key

pytestmark = pytest.mark.integration


def test_config_key_follows_the_dicts_content(loaded):
    config = copy.deepcopy(loaded.scheduler_config)
    key = config_key(config)
    assert config_key(config) == key == config_key(copy.deepcopy(config))
    config["beta_end"] = 0.03  # a dict changed in place gets a new key, not the one kept for it
    assert config_key(config) != key
    config["beta_end"] = loaded.scheduler_config["beta_end"]
    assert config_key(config) == key
    config["trained_betas"] = [0.1, 0.2]
    nested = config_key(config)
    config["trained_betas"].append(0.3)  # nested values too
    assert config_key(config) != nested
