"""Fixtures of the precision tests.

Every tensor here is tiny, so intra-op threads only add synchronisation; on a
loaded machine a second OpenMP thread makes a 32×65 matmul ~100× slower. The
tests run single-threaded (restored afterwards); bit-for-bit comparisons are
made between runs inside one test, so they do not depend on the thread count.
"""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """Every precision test runs under the shared `one_thread` fixture."""
