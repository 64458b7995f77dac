"""Leaks are reported by the test that made them: garbage (an unclosed socket or transport of a
test's client) is collected at the end of every test, not whenever the collector next runs."""

import gc

import pytest


@pytest.fixture(autouse=True)
def _collect_garbage_after_each_test():
    yield
    gc.collect()
