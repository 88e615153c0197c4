"""Fault injection (scripts/fault_injection.py): struck runs lose nothing and resume exactly."""

import importlib.util
import pathlib
import random
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location(
        "fault_injection", REPO / "scripts" / "fault_injection.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


faults = _load_script()


@pytest.fixture(scope="module")
def injector(tmp_path_factory):
    """One uninterrupted reference run of 30 steps that every strike is compared with."""
    return faults.Injector(tmp_path_factory.mktemp("faults"), steps=30, rng=random.Random(0))


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["sigkill", "sigterm", "corrupt", "concurrent", "disk_full"])
def test_a_struck_run_loses_nothing_good_and_resumes_bit_for_bit(injector, fault):
    strike = getattr(injector, fault)()
    if strike.outcome.startswith("skipped"):
        pytest.skip(strike.outcome)
    assert strike.ok, f"{strike.detail}: {strike.outcome}"


def test_the_table_counts_strikes_and_names_failures():
    strikes = [
        faults.Strike("sigkill", "a", True, "equal"),
        faults.Strike("sigkill", "b", False, "differs"),
        faults.Strike("nan", "c", True, "stopped"),
    ]
    rows = faults.table(strikes).splitlines()
    assert rows[2] == "| sigkill | 2 | 1/2 ok; failed: differs |"
    assert rows[3] == "| nan | 1 | 1/1 ok |"
