"""Autoguidance in the engine: the guide model's forward in the same tick and the same compute thread as the
main model's, its rows in admission and in the tick's stats."""

import asyncio
import threading

import pytest
import torch

from app.config import DEFAULT_MODEL_PATH
from app.engine import EngineStats, Failed, Finished
from app.guidance import GuidanceMethod, GuidanceSchedule
from app.models import load_checkpoint, unet_denoiser
from app.sampling import GuidanceParams, SampleRun, SampleSpec, sample
from tests.engine.test_engine import make_client
from tests.sampling.test_autoguidance_run import one_row_at_a_time

GUIDE = "fashion-mnist-guide"
INTERVAL = GuidanceSchedule("interval", start=0.0, end=1.0, sigma_min=0.25, sigma_max=5.0)


def autoguidance(scale: float, cfg: bool = False, guidance_scale: float = 3.0, **kw) -> GuidanceParams:
    method = GuidanceMethod("autoguidance", guide=GUIDE, scale=scale, cfg=cfg)
    return GuidanceParams(guidance_scale, method=method, **kw)


@pytest.fixture
def one_thread():
    """One torch thread: forwards of a row or two on the shared 2-core machine (tests/sampling/
    test_autoguidance_run.py says why); both sides of a comparison run under it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


async def in_one_tick(client, specs: list[SampleSpec]) -> list[Finished | Failed]:
    """Send every request while the compute thread is held, so that its next tick takes them all at once."""
    entered, release = threading.Event(), threading.Event()

    def hold() -> None:
        entered.set()
        release.wait(60)

    held = asyncio.ensure_future(client.engine.run_in_worker(hold))
    while not entered.is_set():
        await asyncio.sleep(0.01)
    ids = [client.add(spec) for spec in specs]
    release.set()
    await held
    return [await client.result(i) for i in ids]


@pytest.mark.integration
def test_autoguidance_and_cfg_requests_in_one_tick_each_draw_what_they_draw_alone(loaded, denoiser, one_thread):
    """Five autoguidance requests (w, cfg, schedule, sampler, seeds and steps differ) and two CFG requests admitted
    at the same tick, with the real default model guided by the real guide: each one's images are bit-equal to
    its run sampled alone (forwards row by row: a batched CPU convolution differs by ~1e-5 between row counts)."""
    guide = unet_denoiser(load_checkpoint(DEFAULT_MODEL_PATH.parent / GUIDE, "cpu").unet)
    main, guides = one_row_at_a_time(denoiser), {GUIDE: one_row_at_a_time(guide)}
    specs = [
        SampleSpec(3, (1, 2), 6, "dpmpp_2m_karras", autoguidance(2.0)),
        SampleSpec(3, (3,), 5, "euler_a", autoguidance(1.5)),
        SampleSpec(6, (4, 5), 7, "ddpm", autoguidance(2.0, cfg=True, schedule=INTERVAL)),
        SampleSpec(None, (6,), 6, "ddim", autoguidance(2.5)),
        SampleSpec(9, (7,), 6, "dpmpp_2m", autoguidance(3.0, cfg=True, guidance_scale=2.0)),
        SampleSpec(3, (1, 2), 6, "dpmpp_2m_karras", GuidanceParams(2.0)),
        SampleSpec(0, (8,), 5, "euler_a", GuidanceParams(3.0, schedule=INTERVAL)),
    ]
    stats: list[EngineStats] = []

    async def main_():
        client = make_client(loaded, main, stats, guides=guides)
        await client.start()
        results = await in_one_tick(client, specs)
        await client.shutdown()
        return results

    results = asyncio.run(main_())
    first = stats[0]
    assert first.active_requests == len(specs)
    assert first.guide_rows == 2 + 1 + 2 + 1 + 1  # every autoguidance request's images, through the guide
    for i, (spec, result) in enumerate(zip(specs, results, strict=True)):
        assert isinstance(result, Finished), result
        alone = SampleRun(spec, loaded.scheduler_config, (1, 28, 28), loaded.manifest.null_label)
        sample(main, [alone], guides=guides)
        assert (result.images == alone.images()).all(), i


@pytest.mark.stand_in
def test_guide_rows_count_in_admission_and_in_the_stats(loaded, denoiser):
    """max_batch_rows 6: an autoguidance request with constant CFG over 2 images takes 6 rows a step (2
    conditional, 2 unconditional, 2 through the guide), so a 1-row request behind it waits for it to finish;
    one of 3 images (9 rows) is refused. The stand-in guides itself here: the engine does not check the pairing
    (the API does, from the manifests)."""
    stats: list[EngineStats] = []
    spec = SampleSpec(3, (1, 2), 4, "ddim", autoguidance(2.0, cfg=True))

    async def main_():
        client = make_client(loaded, denoiser, stats, max_batch_rows=6, guides={GUIDE: denoiser})
        await client.start()
        big = client.add(SampleSpec(3, (1, 2, 3), 4, "ddim", autoguidance(2.0, cfg=True)))
        results = await in_one_tick(client, [spec, SampleSpec(5, (9,), 4, "ddim", GuidanceParams(1.0))])
        refused = await client.result(big)
        await client.shutdown()
        return results, refused

    (guided, small), refused = asyncio.run(main_())
    assert isinstance(guided, Finished) and isinstance(small, Finished)
    assert isinstance(refused, Failed) and refused.kind == "invalid"
    assert "needs 9 rows at a step (its guide model's rows included)" in refused.message
    ticks = [(s.rows, s.guide_rows) for s in stats]
    assert ticks == [(4, 2)] * 4 + [(1, 0)] * 4  # never both requests in one tick: 4 + 2 + 1 > 6
    assert all(s.cond_rows + s.uncond_rows == s.rows for s in stats)


@pytest.mark.stand_in
def test_a_request_naming_a_guide_the_engine_does_not_serve_fails_as_invalid(loaded, denoiser):
    async def main_():
        client = make_client(loaded, denoiser)
        await client.start()
        result = await client.result(client.add(SampleSpec(3, (1,), 4, "ddim", autoguidance(2.0))))
        await client.shutdown()
        return result

    result = asyncio.run(main_())
    assert isinstance(result, Failed) and result.kind == "invalid"
    assert "method.guide 'fashion-mnist-guide' is not a guide served for model" in result.message
