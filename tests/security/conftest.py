"""The adversarial suite's fixtures: one throw-away namespace and CA per module, a fresh target per test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from tests.security.hostile import Pki, Target, target, throwaway_netns


@pytest.fixture(scope="module")
def netns() -> Iterator[str]:
    with throwaway_netns() as path:
        yield path


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki()


@pytest.fixture
async def served(netns: str, pki: Pki) -> AsyncIterator[Target]:
    async with target(netns, pki) as running:
        yield running
