"""Shared fixtures of tests/ (the 8-device CPU mesh is set up by the repository's root conftest.py)."""

import pytest


@pytest.fixture(scope="session")
def ckpt_root(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpts")
