"""Root conftest of the tests.

Because tests/ is a package, pytest puts the repository root on sys.path while it imports this
file, so test modules can import tests.fakes even when pytest runs without `python -m`.
"""

from imgsearch_common.logs import configure_logging

# Log records go to stderr as JSON lines, as in a service, so that stdout holds only a command's output.
configure_logging("debug", json=True)
