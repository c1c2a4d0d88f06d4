"""What the property-based (hypothesis) tests share: their settings, a count of the cases
they run (printed at the end of the session by conftest.pytest_terminal_summary), and the
check that an error names what is wrong."""

from __future__ import annotations

import re
from collections import Counter
from typing import Iterable

from hypothesis import HealthCheck, settings

# Generated cases run, per suite; conftest prints them so that CI output shows the count.
CASES: Counter = Counter()


def count(suite: str) -> None:
    CASES[suite] += 1


def fuzz_settings(max_examples: int) -> settings:
    """Reproducible in CI (derandomize: the same cases on every run and machine), no
    per-example deadline (2-core CI machines are slow and noisy), no example database
    written into the checkout."""
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


def assert_names_one_of(error: BaseException, names: Iterable[str], whole_words: bool = False) -> None:
    """The message of ``error`` contains one of ``names`` (with ``whole_words``: not as part
    of a longer identifier, so that "exp_avg" is not found in "exp_avg_sq")."""
    names = sorted(set(names))
    message = str(error)

    def pattern(n: str) -> str:
        return rf"(?<![A-Za-z0-9_]){re.escape(n)}(?![A-Za-z0-9_])" if whole_words else re.escape(n)

    assert any(re.search(pattern(n), message) for n in names), \
        f"{type(error).__name__} does not name any of {names}: {message}"
