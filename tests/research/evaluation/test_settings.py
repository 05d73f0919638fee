import json

import pytest

from app.guidance import Cads, GuidanceMethod, GuidanceSchedule
from app.sampling import GuidanceParams
from app.sampling.cache import DeepCacheParams, FirstBlockParams
from research.evaluation.settings import (
    REFERENCE_NAME,
    GuidanceSetting,
    Row,
    SettingError,
    choose_settings,
    default_settings,
    parse_setting,
    setting_from_dict,
    setting_to_dict,
    table_rows,
)


def by_name() -> dict[str, GuidanceSetting]:
    return {s.name: s for s in default_settings()}


def test_the_default_table_is_the_issues_list():
    settings = by_name()
    assert len(settings) == len(default_settings())  # names are unique
    ddim = sorted(name for name, s in settings.items() if "ddim" in s.samplers)
    assert ddim == ["apg s=3", "apg s=5", "cfg s=1", "cfg s=3", "cfg s=5"]
    assert all("dpmpp_2m" in s.samplers for s in settings.values())
    g = {name: s.guidance for name, s in settings.items()}
    assert [g[f"cfg s={s}"].guidance_scale for s in (1, 2, 3, 5)] == [1, 2, 3, 5]
    assert g["cfg s=3"] == GuidanceParams(guidance_scale=3.0)
    assert g["apg s=7.5"] == GuidanceParams(guidance_scale=7.5, method=GuidanceMethod(kind="apg"))
    assert g["cfg-zero* s=5"].method == GuidanceMethod(kind="cfg_zero_star")
    assert g["cosine 1->0 s=3"].schedule == GuidanceSchedule(kind="cosine", start=1.0, end=0.0)
    assert g["linear 0->1 s=5"].schedule == GuidanceSchedule(kind="linear", start=0.0, end=1.0)
    interval = g["interval sigma 0.3-5 s=3"].schedule
    assert (interval.kind, interval.start, interval.end, interval.sigma_min, interval.sigma_max) == (
        "interval", 0.0, 1.0, 0.3, 5.0,
    )  # fmt: skip
    # The interval guides the steps with sigma in (0.3, 5] and only those (steps 0..19 at 20 steps).
    sigmas = [10.0, 5.0, 1.0, 0.3, 0.1]
    assert interval.scales(3.0, 5, sigmas) == [1.0, 3.0, 3.0, 1.0, 1.0]
    assert (g["noise 0.1 s=3"].noise_level, g["noise 0.1 s=3"].noise_schedule) == (0.1, "constant")
    assert (g["noise 0.3 sigma s=3"].noise_level, g["noise 0.3 sigma s=3"].noise_schedule) == (0.3, "sigma")
    assert g["cads s=5"] == GuidanceParams(guidance_scale=5.0, cads=Cads())
    assert g["rescale 0.7 s=3"] == GuidanceParams(guidance_scale=3.0, guidance_rescale=0.7)


def test_every_default_setting_round_trips_through_its_json():
    for setting in default_settings():
        assert parse_setting(json.dumps(setting_to_dict(setting))) == setting


def test_parse_setting_fills_the_dataclass_defaults():
    s = parse_setting('{"name": "apg s=5 r=1", "guidance_scale": 5, "method": {"kind": "apg", "norm_threshold": 1.0}}')
    assert s.name == "apg s=5 r=1" and s.samplers == ()  # every sampler of the table
    assert s.guidance == GuidanceParams(
        guidance_scale=5.0, method=GuidanceMethod(kind="apg", norm_threshold=1.0)
    )  # eta and momentum: GuidanceMethod's defaults
    assert parse_setting('{"name": "plain"}').guidance == GuidanceParams()
    assert parse_setting('{"name": "c", "cads": true}').guidance.cads == Cads()
    assert parse_setting('{"name": "c", "cads": {"noise_scale": 0.1}}').guidance.cads == Cads(noise_scale=0.1)
    assert parse_setting('{"name": "c", "cads": null}').guidance.cads is None
    interval = parse_setting('{"name": "i", "schedule": {"kind": "interval", "sigma_max": 5}}').guidance.schedule
    assert interval == GuidanceSchedule(kind="interval", start=0.0, end=1.0, sigma_max=5.0)
    assert parse_setting('{"name": "d", "samplers": "ddim"}').samplers == ("ddim",)
    cached = parse_setting('{"name": "c", "cache": {"kind": "deepcache", "interval": 2, "start": 0.5}}')
    assert cached.cache == DeepCacheParams(interval=2, branch=0, start=0.5, end=1.0)
    assert parse_setting('{"name": "c", "cache": {"kind": "none"}}').cache is None
    assert parse_setting(json.dumps(setting_to_dict(cached))) == cached  # the JSON form draws it again
    first = parse_setting('{"name": "f", "cache": {"kind": "first_block", "threshold": 0.2}}')
    assert first.cache == FirstBlockParams(threshold=0.2)
    assert parse_setting(json.dumps(setting_to_dict(first))) == first


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"name": "x",', "not valid JSON"),
        ("[1, 2]", "expected a JSON object with at least a name, got [1, 2]"),
        ('{"guidance_scale": 3}', '"name" is required'),
        ('{"name": "  "}', '"name" is required'),
        ('{"name": "a,b"}', "a name cannot contain a comma"),
        (
            '{"name": "x", "scale": 4}',
            "setting 'x': unknown field 'scale'; expected one of name, samplers, cache, guidance_scale",
        ),
        ('{"name": "x", "method": {"kind": "apg", "norm": 1}}', "setting 'x': method: unknown field 'norm'"),
        (
            '{"name": "x", "method": {"kind": "sag"}}',
            'method: kind must be one of cfg, apg, cfg_zero_star, pag, seg, slg, autoguidance, got "sag"',
        ),
        ('{"name": "x", "method": "apg"}', "method: expected an object of GuidanceMethod fields"),
        (
            '{"name": "x", "schedule": {"kind": "step"}}',
            "schedule: kind must be one of constant, linear, cosine, interval",
        ),
        ('{"name": "x", "noise_schedule": "exp"}', "noise_schedule must be one of constant, sigma, guidance"),
        ('{"name": "x", "guidance_scale": "5"}', 'guidance_scale must be a finite number, got "5"'),
        ('{"name": "x", "guidance_scale": true}', "guidance_scale must be a finite number, got true"),
        ('{"name": "x", "guidance_scale": -1}', "guidance_scale must be 0 or more, got -1"),
        ('{"name": "x", "guidance_rescale": 1.5}', "guidance_rescale must be between 0 and 1, got 1.5"),
        ('{"name": "x", "noise_level": null}', "noise_level must be a finite number, got null"),
        (
            '{"name": "x", "schedule": {"kind": "interval", "sigma_min": 5, "sigma_max": 1}}',
            "sigma_min (5) must be below sigma_max (1)",
        ),
        (
            '{"name": "x", "schedule": {"kind": "interval", "start": 0.5, "end": 0.2}}',
            "an interval needs 0 <= start < end <= 1",
        ),
        ('{"name": "x", "cads": {"tau1": 0.9, "tau2": 0.5}}', "cads.tau1 (0.9) must not exceed cads.tau2 (0.5)"),
        ('{"name": "x", "cads": {"psi": 2}}', "cads: psi: Input should be less than or equal to 1, got 2"),
        ('{"name": "x", "samplers": ["ddim", "plms"]}', "unknown sampler(s) ['plms']"),
        ('{"name": "x", "samplers": []}', "samplers must be a non-empty list of sampler names"),
        ('{"name": "x", "cache": {"kind": "teacache"}}', 'cache: expected {"kind": "none"} or {"kind": "deepcache"'),
        ('{"name": "x", "cache": {"kind": "first_block", "interval": 2}}', "cache: unknown field 'interval'"),
        ('{"name": "x", "cache": {"kind": "first_block", "threshold": 2}}', "threshold must be in (0, 1], not 2"),
        ('{"name": "x", "cache": {"kind": "deepcache", "every": 2}}', "cache: unknown field 'every'"),
        ('{"name": "x", "cache": {"kind": "deepcache", "interval": 2.5}}', "cache: interval must be an integer"),
        ('{"name": "x", "cache": {"kind": "deepcache", "interval": 0}}', "interval must be at least 1, not 0"),
        ('{"name": "x", "cache": {"kind": "deepcache", "start": 0.8, "end": 0.2}}', "0 <= start <= end <= 1"),
    ],
)
def test_parse_setting_errors_name_the_field(text, message):
    with pytest.raises(SettingError) as exc:
        parse_setting(text)
    assert message in str(exc.value)


def test_choose_settings_and_table_rows():
    extra = setting_from_dict({"name": "apg s=5 r=1", "method": {"kind": "apg", "norm_threshold": 1.0}})
    chosen = choose_settings(["apg s=5", "cfg s=2"], [extra])
    assert [s.name for s in chosen] == ["cfg s=2", "apg s=5", "apg s=5 r=1"]  # the default order, then extras
    rows = table_rows(chosen, ["ddim", "dpmpp_2m"])
    assert [(r.setting.name, r.sampler) for r in rows] == [
        (REFERENCE_NAME, "ddim"), ("apg s=5", "ddim"), ("apg s=5 r=1", "ddim"),  # cfg s=2 is dpmpp_2m only
        (REFERENCE_NAME, "dpmpp_2m"), ("cfg s=2", "dpmpp_2m"), ("apg s=5", "dpmpp_2m"), ("apg s=5 r=1", "dpmpp_2m"),
    ]  # fmt: skip
    assert Row(extra, "ddim").label == "apg s=5 r=1 (ddim)"
    assert len(choose_settings(None)) == len(default_settings())
    with pytest.raises(SettingError, match=r"unknown setting\(s\) \['cfg s=4'\]; the defaults are: cfg s=1"):
        choose_settings(["cfg s=4"])
    with pytest.raises(SettingError, match=r"extra setting name\(s\) \['cfg s=3'\] already taken"):
        choose_settings(None, [setting_from_dict({"name": "cfg s=3"})])
    with pytest.raises(SettingError, match="already taken"):
        choose_settings([], [extra, extra])
