"""``ferroparallel.util`` and the modules kept under ipyparallel's names (unit tests)."""

from __future__ import annotations

import importlib
import socket
import warnings
from datetime import UTC, datetime, timedelta

import pytest

import ferroparallel as ipp
from ferroparallel import util


def test_util_is_an_attribute_and_has_ipyparallels_names() -> None:
    assert ipp.util is util and "util" in dir(ipp)
    assert util.interactive is ipp.interactive
    for name in util.__all__:
        assert callable(getattr(util, name)), name


def test_urls() -> None:
    assert util.split_url("tcp://10.0.0.1:5555") == ("tcp", "10.0.0.1", "5555")
    assert util.split_url("tcp://[::1]:7") == ("tcp", "::1", "7")
    assert util.split_url("ipc:///tmp/x") == ("ipc", "/tmp/x", "")
    with pytest.raises(ValueError, match="host:port"):
        util.split_url("tcp://nohost")
    # wildcards become the loopback address here, or the server's host elsewhere
    assert util.disambiguate_url("tcp://0.0.0.0:5555") == "tcp://127.0.0.1:5555"
    assert util.disambiguate_url("tcp://*:5555", "10.1.2.3") == "tcp://10.1.2.3:5555"
    assert util.disambiguate_url("tcp://*:5555", socket.gethostname()) == "tcp://127.0.0.1:5555"
    assert util.disambiguate_url("tcp://10.9.9.9:1", "10.1.2.3") == "tcp://10.9.9.9:1"
    assert util.disambiguate_url("ipc:///tmp/sock") == "ipc:///tmp/sock"
    assert util.disambiguate_url("not-a-url") == "not-a-url"
    assert util.disambiguate_ip_address("0.0.0.0") == util.localhost() == "127.0.0.1"
    assert util.disambiguate_ip_address("garbage") == "garbage"


def test_disambiguate_warns_of_a_location_that_does_not_resolve() -> None:
    """As ipyparallel's: an unresolvable host name is returned as given, with a warning."""
    wontresolve = "this.wontresolve.dns"
    with pytest.warns(RuntimeWarning, match=f"could not determine IPs for {wontresolve}"):
        assert util.disambiguate_ip_address("0.0.0.0", wontresolve) == wontresolve
    with pytest.warns(RuntimeWarning, match=wontresolve):
        assert util.disambiguate_url("tcp://*:5", wontresolve) == f"tcp://{wontresolve}:5"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # names of this machine and addresses: no lookup, no warning
        assert util.disambiguate_ip_address("0.0.0.0", socket.gethostname()) == "127.0.0.1"
        assert util.disambiguate_ip_address("*", "10.1.2.3") == "10.1.2.3"
        assert util.disambiguate_ip_address("10.9.9.9", wontresolve) == "10.9.9.9"
    assert util.is_url("tcp://1.2.3.4:5") and util.is_url("inproc://x")
    assert not util.is_url("http://x") and not util.is_url("1.2.3.4:5") and not util.is_url(3)
    assert util.is_ip("10.0.0.1") and util.is_ip("::1") and not util.is_ip("localhost")
    assert util.validate_url("tcp://127.0.0.1:5555")
    assert util.validate_url_container({"a": "tcp://1.2.3.4:5", "b": ["ipc:///x"]})
    for bad, exc in [
        ("tcp://127.0.0.1", ValueError),
        ("tcp://h:port", ValueError),
        ("udp://h:1", ValueError),
        ("h:1", ValueError),
        (5, TypeError),
    ]:
        with pytest.raises(exc):
            util.validate_url(bad)
    with pytest.raises(ValueError):
        util.validate_url_container(["tcp://1.2.3.4:5", "tcp://nope"])


def test_ports_dates_and_keys() -> None:
    ports = util.select_random_ports(3)
    assert len(set(ports)) == 3 and all(0 < p < 65536 for p in ports)
    now = util.utcnow()
    assert now.tzinfo is not None and abs(now - datetime.now(UTC)) < timedelta(seconds=5)
    naive = datetime(2020, 1, 1, 12)
    assert util.ensure_timezone(naive).tzinfo is not None
    assert util.ensure_timezone(now) is now
    assert util.compare_datetimes(naive + timedelta(seconds=3), naive) == timedelta(seconds=3)
    mixed = util.compare_datetimes(util.ensure_timezone(naive), naive)
    assert mixed == timedelta(0)
    assert util.utc is UTC  # (ipyparallel's name, imported from util by its users)
    assert util.utcnow().tzinfo is util.utc
    d = {"1": "a", "x": "b", 2: "c"}
    assert util.int_keys(d) is d and d == {1: "a", "x": "b", 2: "c"}
    with pytest.raises(KeyError):
        util.int_keys({"1": 1, 1: 2})


@pytest.mark.parametrize(
    "module, names",
    [
        ("ferroparallel.joblib", ["register"]),
        ("ferroparallel.client.map", ["Map", "RoundRobinMap", "dists"]),
        (
            "ferroparallel.controller.dependency",
            ["Dependency", "UnmetDependency", "depend", "dependent", "require", "interactive"],
        ),
    ],
)
def test_modules_under_ipyparallels_names(module: str, names: list[str]) -> None:
    m = importlib.import_module(module)
    for name in names:
        assert hasattr(m, name), name
    if module.endswith("dependency"):
        assert m.Dependency is ipp.Dependency and m.require is ipp.require
    if module.endswith(".map"):
        parts = [m.dists[d]().getPartition(list(range(7)), 0, 2) for d in ("b", "r")]
        assert parts == [[0, 1, 2, 3], [0, 2, 4, 6]]


def test_joblib_register_under_ipyparallels_module() -> None:
    pytest.importorskip("joblib")
    from joblib.parallel import BACKENDS

    importlib.import_module("ferroparallel.joblib").register("fp-test-backend")
    assert "fp-test-backend" in BACKENDS
