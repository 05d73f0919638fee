"""What the engine refuses as it takes a request (app/engine/admission.py), checked on runs of the shipped checkpoint:
the step caches a model can't run, a guide it does not serve, a deadline with no pace measured; and the engine's
own gate (refuse_unless_open). Over HTTP the API refuses these first, naming the fields
(tests/api/test_cache_api.py, test_autoguidance_api.py, test_deadlines.py)."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest

from app.engine.admission import (
    EngineClosedError,
    cache_refusal,
    deadline_refusal,
    guide_refusal,
    model_refusal,
    refuse_unless_open,
)
from app.engine.scheduler import EngineRequest, Scheduler
from app.guidance.autoguidance import AutoguidanceMethod
from app.sampling import DEFAULT_GUIDANCE, SampleSpec
from app.sampling.cache import ANY_MODEL_CACHE_KINDS, DeepCacheParams, FirstBlockParams, SkipParams, UncondParams
from tests.sampling.test_cache_run import make_run


def spec(cache=None, **guidance) -> SampleSpec:
    return SampleSpec(3, (1,), 4, guidance=DEFAULT_GUIDANCE, cache=cache, **guidance)


def test_a_model_without_a_step_cache_runs_the_caches_that_enter_no_network(loaded, denoiser):
    # A forward that is only a function (an imported model's, say) has no cache_support: the uncond and skip
    # caches skip rows and run on it; deepcache and first_block need the network's own support.
    def plain(x, t, labels):
        return denoiser(x, t, labels)

    assert ANY_MODEL_CACHE_KINDS == {"uncond", "skip"}
    assert cache_refusal(make_run(loaded, denoiser, spec(UncondParams(2, 1))), "m", plain) is None
    assert cache_refusal(make_run(loaded, denoiser, spec(SkipParams())), "m", plain) is None
    for cache in (DeepCacheParams(interval=3), FirstBlockParams(threshold=0.1)):
        refusal = cache_refusal(make_run(loaded, denoiser, spec(cache)), "m", plain)
        assert refusal == ("invalid", "model m has no step cache: cache.kind must be none")


def test_the_unet_runs_deepcache_to_its_deepest_branch_and_not_first_block(loaded, denoiser):
    deepest = denoiser.deepcache_branches()
    assert deepest == 2
    assert cache_refusal(make_run(loaded, denoiser, spec(DeepCacheParams(branch=deepest))), "m", denoiser) is None
    too_deep = cache_refusal(make_run(loaded, denoiser, spec(DeepCacheParams(branch=deepest + 1))), "m", denoiser)
    assert too_deep == ("invalid", "model m: deepcache branch must be 0..2 (got 3)")
    kind, why = cache_refusal(make_run(loaded, denoiser, spec(FirstBlockParams())), "m", denoiser)
    assert kind == "invalid" and why.startswith("model m: ")
    assert cache_refusal(make_run(loaded, denoiser, spec()), "m", denoiser) is None


def test_a_guide_the_engine_does_not_serve_is_refused_naming_those_it_does(loaded, denoiser):
    method = AutoguidanceMethod(guide="small")
    guided = make_run(loaded, denoiser, SampleSpec(3, (1,), 4, guidance=replace(DEFAULT_GUIDANCE, method=method)))
    assert guide_refusal(guided, "m", {"small": denoiser}) is None
    assert guide_refusal(guided, "m", {}) == (
        "invalid",
        "method.guide 'small' is not a guide served for m (served guides: none)",
    )
    # model_refusal checks all three, the guide among them; a run that names none passes all three.
    assert model_refusal(guided, "m", denoiser, None, {"other": denoiser})[1].endswith("(served guides: other)")
    assert model_refusal(make_run(loaded, denoiser, spec()), "m", denoiser, None, {}) is None


def test_a_deadline_is_judged_only_once_a_tick_has_been_measured(loaded, denoiser):
    request = EngineRequest("r", make_run(loaded, denoiser, spec()), time.monotonic(), False)
    scheduler = Scheduler(32, 8)
    assert deadline_refusal(request, time.monotonic() + 1e-6, None, 0, scheduler) is None


def test_the_engine_gate_names_the_priorities_and_why_it_is_closed():
    refuse_unless_open("interactive", None, True)
    with pytest.raises(ValueError, match="priority must be one of interactive, batch, not 'urgent'"):
        refuse_unless_open("urgent", None, True)
    with pytest.raises(EngineClosedError, match="the engine failed: boom"):
        refuse_unless_open("batch", "boom", True)
    with pytest.raises(EngineClosedError, match="not accepting"):
        refuse_unless_open("batch", None, False)
