"""Tuning's packages come with the 'tune' extra; a run that lacks one names the extra to install."""

import importlib.util

import pytest

from graphopt.backends.tuning import tuner
from graphopt.core.errors import UsageError


def _without(monkeypatch, *names):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n in names else real(n, *a))


def test_missing_cost_model_names_the_extra(monkeypatch):
    _without(monkeypatch, "xgboost")
    with pytest.raises(UsageError, match=r"pip install 'graphopt\[tune\]' \(missing: xgboost"):
        tuner.require_tune_extra(trials=64, rpc=None)


def test_schedule_search_alone_does_not_need_the_cost_model(monkeypatch):
    _without(monkeypatch, "xgboost", "tornado")
    tuner.require_tune_extra(trials=0, rpc=None)  # graphopt's own search: no xgboost, no RPC


def test_rpc_needs_tornado(monkeypatch):
    _without(monkeypatch, "tornado")
    with pytest.raises(UsageError, match="tornado"):
        tuner.require_tune_extra(trials=0, rpc="127.0.0.1:9190:board")


def test_tune_command_refuses_before_any_work(monkeypatch, capsys):
    from graphopt.front.cli import main

    _without(monkeypatch, "xgboost")
    assert main(["tune", "light:squeezenet", "--trials", "8"]) == 2
    err = capsys.readouterr().err
    assert "graphopt[tune]" in err and "Traceback" not in err
