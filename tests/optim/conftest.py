import pytest

import meanwise.optim._base as base


@pytest.fixture(params=["whole", "chunked"])
def chunking(request, monkeypatch):
    """Run a test twice: default bundles, and bundles of 7 elements (slices every tensor, so the
    cache-chunked execution path is exercised on these small models)."""
    if request.param == "chunked":
        monkeypatch.setattr(base, "CPU_CHUNK_ELEMENTS", 7)
    return request.param
