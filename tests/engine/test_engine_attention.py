"""Attention guidance in the engine: its perturbed rows counted in each tick's stats, and a request whose
perturbation the model can't run refused before any forward, leaving the others to finish."""

import asyncio

import pytest

from app.engine import EngineStats, Failed, Finished
from app.guidance import GuidanceMethod
from app.models.attention import perturbation_support
from app.sampling import GuidanceParams, SampleSpec
from tests.engine.test_engine import make_client

pytestmark = pytest.mark.stand_in  # the rows and refusals, not the images: the stand-in's UNet has the same mid block


def pag(**fields) -> GuidanceParams:
    return GuidanceParams(3.0, method=GuidanceMethod("pag", **fields))


def test_each_tick_counts_its_perturbed_rows(loaded, denoiser):
    stats: list[EngineStats] = []

    async def main():
        client = make_client(loaded, denoiser, stats)
        await client.start()
        ids = [
            client.add(SampleSpec(class_label=1, seeds=(1, 2), steps=3, guidance=pag())),  # 2 cond, 2 uncond, 2 pag
            client.add(SampleSpec(class_label=2, seeds=(3,), steps=3, guidance=pag(cfg=False))),  # 1 cond, 1 pag
            client.add(SampleSpec(class_label=None, seeds=(4,), steps=3, guidance=pag())),  # 1 null, 1 pag
            client.add(SampleSpec(class_label=3, seeds=(5,), steps=3, guidance=GuidanceParams(3.0))),  # 1 + 1
        ]
        results = [await client.result(i) for i in ids]
        await client.shutdown()
        return results

    results = asyncio.run(main())
    assert all(isinstance(r, Finished) for r in results)
    full = [s for s in stats if s.active_requests == 4]
    assert full, "the four requests never shared a tick"
    for s in full:
        assert (s.rows, s.cond_rows, s.uncond_rows, s.perturbed_rows) == (12, 4, 4, 4)
        assert s.skipped_uncond_rows == 0  # cfg false skips nothing: its weight is 3


@pytest.mark.parametrize(
    "precision, method, why",
    [
        ("fp32", GuidanceMethod("slg"), "it skips transformer blocks, and this UNet2DModel has none"),
        ("fp32", GuidanceMethod("seg", layers=(0, 3)), "seg layers [3] out of range"),
        ("int8", GuidanceMethod("pag"), "precision int8 runs a quantized graph"),
    ],
)
def test_a_perturbation_the_model_cant_run_is_refused_and_the_others_finish(loaded, denoiser, precision, method, why):
    support = perturbation_support(loaded.network, precision)
    stats: list[EngineStats] = []

    async def main():
        client = make_client(loaded, denoiser, stats, perturbations=support)
        await client.start()
        good = client.add(SampleSpec(class_label=1, seeds=(1,), steps=3))
        bad = client.add(SampleSpec(class_label=2, seeds=(2,), steps=3, guidance=GuidanceParams(3.0, method=method)))
        results = await client.result(good), await client.result(bad)
        healthy = client.check_health()
        await client.shutdown()
        return results, healthy

    (good, bad), healthy = asyncio.run(main())
    assert isinstance(good, Finished) and healthy
    assert isinstance(bad, Failed) and bad.kind == "invalid" and why in bad.message, bad
    assert not any(s.perturbed_rows for s in stats)
