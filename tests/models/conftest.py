import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models: intra-op threads only add contention on a shared 2-core machine (10× slower)."""
