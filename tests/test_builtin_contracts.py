"""Core's built-in plugins pass the same contract suites as every third-party backend."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from pegaflow_conformance import IndexContract, TransportContract
from pegaflow_core.default_plugins.local_index import LocalIndex
from pegaflow_core.default_plugins.loopback import LoopbackTransport
from pegaflow_core.index import Index
from pegaflow_core.transport import Transport


class TestLocalIndex(IndexContract):
    @pytest.fixture
    def index_factory(self, tmp_path) -> Iterator[Callable[[], Index]]:
        made: list[LocalIndex] = []

        def factory() -> Index:
            made.append(LocalIndex(LocalIndex.conformance_options(tmp_path)))
            return made[-1]

        yield factory
        for index in made:
            index.close()


class TestLoopbackTransport(TransportContract):
    @pytest.fixture
    def transport_factory(self, tmp_path) -> Iterator[Callable[[], Transport]]:
        made: list[LoopbackTransport] = []

        def factory() -> Transport:
            made.append(LoopbackTransport(LoopbackTransport.conformance_options(tmp_path)))
            return made[-1]

        yield factory
        for transport in made:
            transport.close()
