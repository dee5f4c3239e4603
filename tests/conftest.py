"""Test-suite wide settings: the verifier runs after every pass of every pipeline run in the tests."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def verify_after_every_pass(monkeypatch):
    """PassContext reads this: every pass in every test is followed by graphopt's verifier."""
    monkeypatch.setenv("GRAPHOPT_VERIFY_EACH_PASS", "1")
    yield


@pytest.fixture
def tmp_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


# Keep BLAS/ORT/TVM to the machine's 2 cores in tests.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TVM_NUM_THREADS", "2")
