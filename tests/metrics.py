"""Reading the service's /metrics text in tests."""

from __future__ import annotations

import re

from prometheus_client.parser import text_string_to_metric_families

_KEY = re.compile(r"(?P<name>\w+)(?:\{(?P<labels>.*)\})?")


def metric_value(text: str, key: str) -> float:
    """The value of a series, as `name` or `name{a="x",b="y"}`: the sum over every series of that name whose
    labels include those given (so `cfg_requests_total{outcome="ok"}` sums over the models). KeyError if none."""
    match = _KEY.fullmatch(key)
    if match is None:
        raise ValueError(f"not a series key: {key!r}")
    wanted = dict(re.findall(r'(\w+)="([^"]*)"', match["labels"] or ""))
    values = [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == match["name"] and wanted.items() <= sample.labels.items()
    ]
    if not values:
        raise KeyError(key)
    return sum(values)
