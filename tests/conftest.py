"""Root conftest of the tests.

Because tests/ is a package, pytest puts the repository root on sys.path while it imports this
file, so test modules can import tests.fakes even when pytest runs without `python -m`.
"""

import pytest

from imgsearch_common.logs import configure_logging

# Log records go to stderr as JSON lines, as in a service, so that stdout holds only a command's output.
configure_logging("debug", json=True, cache_loggers=False)


@pytest.fixture(autouse=True)
def _test_logging():
    """Restore the test logging set-up after each test, since `imgsearch serve` configures logging itself."""
    yield
    configure_logging("debug", json=True, cache_loggers=False)
