"""app/engine/wire.py: what crosses between the API process and the engine process comes back equal."""

import msgpack
import numpy as np
import pytest

from app.engine import EngineOutputs, EngineStats, Failed, Finished, Progress
from app.engine.outputs import CurvePoint
from app.engine.wire import decode, encode
from app.guidance import Cads, GuidanceMethod, GuidanceSchedule
from app.sampling import DEFAULT_GUIDANCE, Preview, SampleSpec
from app.sampling.cache import DeepCacheParams, FirstBlockParams, SkipParams, UncondParams
from app.sampling.spec import GuidanceParams


@pytest.mark.parametrize(
    "spec",
    [
        SampleSpec(class_label=3, seeds=(1, 2), guidance=DEFAULT_GUIDANCE),
        SampleSpec(class_label=None, seeds=(7,), steps=5, sampler="ddim", return_trace=True, preview_every=2),
        SampleSpec(
            class_label=1,
            seeds=(4, 5, 6),
            guidance=GuidanceParams(
                guidance_scale=4.0,
                schedule=GuidanceSchedule("cosine"),
                noise_level=0.5,
                noise_schedule="sigma",
                guidance_rescale=0.7,
                method=GuidanceMethod("apg", eta=0.5),
                cads=Cads(),
            ),
            cache=DeepCacheParams(interval=4, full_sigma_min=1.0, full_sigma_max=20.0, order=1),
        ),
        SampleSpec(class_label=2, seeds=(1,), guidance=GuidanceParams(method=GuidanceMethod("pag"))),
        SampleSpec(class_label=2, seeds=(1,), cache=FirstBlockParams(threshold=0.3, uncond_every=2)),
        SampleSpec(class_label=2, seeds=(1,), cache=UncondParams(every=3, order=0)),
        SampleSpec(class_label=2, seeds=(1,), cache=SkipParams(interval=5, full_sigma_max=5.0, uncond_every=2)),
    ],
)
def test_a_spec_comes_back_equal(spec):
    again = decode(encode(spec))
    assert again == spec and type(again.guidance.method) is type(spec.guidance.method)
    assert isinstance(again.seeds, tuple) and hash(again.seeds) == hash(spec.seeds)


def test_outputs_come_back_with_their_images_and_stats():
    images = np.random.default_rng(0).integers(0, 256, (2, 28, 28, 1), dtype=np.uint8)
    trace = ({"step": 0, "scale": 2.5, "diff_norm": [0.1, 0.2]},)
    outputs = EngineOutputs(
        (
            Progress("a", 3, 20, None, 0.01, trace, Preview(3, images[:1]), event="resumed"),
            Finished("b", images, 0.5, 1.25, trace),
            Failed("c", "deadline", "too late", 2.0),
        ),
        (EngineStats(5, 2, 1, 0.1, 2, class_rows=(("interactive", 5),), client_rows=(("batch", "k", 3),)),),
    )
    again = decode(encode(outputs))
    progress, finished, failed = again.outputs
    assert finished.images.dtype == np.uint8 and np.array_equal(finished.images, images)
    assert np.array_equal(progress.preview.images, images[:1]) and progress.event == "resumed"
    assert failed == outputs.outputs[2] and again.stats == outputs.stats
    assert finished.trace[0]["diff_norm"] == (0.1, 0.2)  # lists come back as tuples (JSON writes them alike)
    assert decode(encode([CurvePoint(0, 999, 80.0, 2.5, 0.0)])) == (CurvePoint(0, 999, 80.0, 2.5, 0.0),)


def test_a_message_naming_a_class_outside_the_package_is_refused():
    # What an engine message may rebuild is limited to this package's dataclasses and pydantic models.
    # pydantic:BaseModel would be built if the package were not checked: the check alone refuses it.
    for name, why in [
        ("os:system", "outside app"),
        ("subprocess:Popen", "outside app"),
        ("pydantic:BaseModel", "outside app"),
        ("app.engine.wire:encode", "neither a dataclass"),
    ]:
        forged = msgpack.ExtType(2, encode((name, {})))
        with pytest.raises(ValueError, match=why):
            decode(msgpack.packb(forged))


def test_what_is_not_plain_data_is_not_sent():
    with pytest.raises(TypeError, match="can't be sent"):
        encode({"x": object()})
