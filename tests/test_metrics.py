"""The per-client share of rows (app/metrics.py's ClientShares and cfg_client_row_share): the top clients by name,
the rest as "other", over a sliding window."""

from prometheus_client import generate_latest

from app.metrics import OTHER_CLIENTS, ClientShares, create_metrics
from tests.metrics import metric_value


def test_the_top_clients_are_named_and_the_rest_summed_as_other():
    shares = ClientShares(top_n=2, window_s=60)
    for client, rows in [("a", 50), ("b", 30), ("c", 15), ("d", 5)]:
        shares.add("m", "batch", client, rows, now=100.0)
    shares.add("m", "interactive", "a", 4, now=100.5)
    got = shares.shares(now=101.0)
    assert got[("m", "batch")] == {"a": 0.5, "b": 0.3, OTHER_CLIENTS: 0.2}
    assert got[("m", "interactive")] == {"a": 1.0, OTHER_CLIENTS: 0.0}


def test_shares_cover_the_last_window_only():
    shares = ClientShares(top_n=4, window_s=10)
    shares.add("m", "batch", "a", 10, now=100.0)
    shares.add("m", "batch", "b", 10, now=105.0)
    assert shares.shares(now=109.0)[("m", "batch")]["a"] == 0.5
    assert shares.shares(now=111.0)[("m", "batch")] == {"b": 1.0, OTHER_CLIENTS: 0.0}
    assert shares.shares(now=200.0) == {}


def test_the_gauge_names_at_most_top_n_clients_per_class_and_model_and_exports_other_when_idle():
    metrics = create_metrics(top_clients=1)
    metrics.add_model("m")
    text = generate_latest(metrics.registry).decode()
    assert metric_value(text, 'cfg_client_row_share{client="other",priority="batch",model="m"}') == 0.0
    for i in range(5):
        metrics.client_shares.add("m", "batch", f"client-{i}", 10 + i, now=0.0)
    metrics.update_client_shares(now=1.0)
    text = generate_latest(metrics.registry).decode()
    series = [line for line in text.splitlines() if line.startswith("cfg_client_row_share{")]
    batch = [line for line in series if 'priority="batch"' in line]
    assert len(batch) == 2 and any('client="client-4"' in line for line in batch)
    assert (
        metric_value(text, 'cfg_client_row_share{client="other",priority="batch",model="m"}') == 46 / 60
    )  # 10 + 11 + 12 + 13 of 60
