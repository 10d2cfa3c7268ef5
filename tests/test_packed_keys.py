"""The packed wire form of block ids and hashes (packed.py) against a real daemon: the client
sends it once the daemon says it reads it, requests in the repeated form (older clients) are still
served the same, and malformed packed fields get precise errors."""

from __future__ import annotations

import grpc
import pytest

from pegaflow_core._proto import pegaflow_pb2 as pb
from pegaflow_core._proto import pegaflow_pb2_grpc as pb_grpc
from pegaflow_core.errors import InvalidArgument
from pegaflow_core.packed import pack_block_ids, pack_hashes
from pegaflow_core.sim_engine import block_hashes


def test_the_daemon_offers_the_packed_form_and_the_client_uses_it(client, make_engine):
    engine = make_engine(model="packed")
    assert engine.handle.packed_keys
    hashes = block_hashes(list(range(16 * 6)), 16)
    assert client.save(engine.handle, engine.allocate(6), hashes).stored == 6
    assert client.save(engine.handle, engine.allocate(6), hashes).already_present == 6
    assert client.query(engine.handle, hashes).hit_blocks == 6
    assert client.query(engine.handle, hashes[:3] + [b"z" * 32] + hashes[4:]).hit_blocks == 3


def test_requests_in_the_repeated_form_are_served_alike(client, make_engine):
    engine = make_engine(model="repeated")
    cid = engine.handle.context_id
    hashes = block_hashes(list(range(16 * 5)), 16)
    saved = client._call("Save", pb.SaveRequest(context_id=cid, block_ids=engine.allocate(5), block_hashes=hashes), "save")
    assert saved.stored == 5
    assert client.save(engine.handle, engine.allocate(5), hashes).already_present == 5  # packed sees them
    old = client._call("Query", pb.QueryRequest(context_id=cid, block_hashes=hashes), "query")
    new = client.query(engine.handle, hashes)
    assert old.hit_blocks == new.hit_blocks == 5
    client.release([old.lease_id, new.lease_id])


class _Recorder(grpc.UnaryUnaryClientInterceptor):
    """Keeps the requests the client sends, so a test sees which wire form went out."""

    def __init__(self) -> None:
        self.sent: list[object] = []

    def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        self.sent.append(request)
        return continuation(details, request)


def test_a_client_facing_an_older_daemon_sends_the_repeated_form(grpc_client, make_engine):
    client = grpc_client  # older daemons have no local socket
    engine = make_engine(model="older", on=client)
    assert client.local_socket is None
    recorder = _Recorder()
    client._stub = pb_grpc.PegaflowStub(grpc.intercept_channel(client._channel, recorder))
    hashes = block_hashes(list(range(16 * 4)), 16)
    engine.handle.packed_keys = False  # what an older daemon's RegisterContext answers
    assert client.save(engine.handle, engine.allocate(4), hashes).stored == 4
    assert client.query(engine.handle, hashes).hit_blocks == 4
    engine.handle.packed_keys = True
    assert client.query(engine.handle, hashes).hit_blocks == 4
    old_save, old_query, new_query = recorder.sent
    assert list(old_save.block_hashes) == hashes and not old_save.packed_block_hashes and len(old_save.block_ids) == 4
    assert list(old_query.block_hashes) == hashes and not old_query.packed_block_hashes
    assert new_query.packed_block_hashes == b"".join(hashes) and new_query.hash_bytes == 32 and not new_query.block_hashes


def test_malformed_packed_fields_get_precise_errors(client, make_engine):
    engine = make_engine(model="bad-packed")
    cid = engine.handle.context_id
    ids = pack_block_ids([0, 1])
    hashes, size = pack_hashes([b"a" * 32, b"b" * 32])

    def save(**fields: object) -> None:
        client._call("Save", pb.SaveRequest(context_id=cid, **fields), "save")

    with pytest.raises(InvalidArgument, match="not a whole number of 32-byte hashes"):
        save(packed_block_ids=ids, packed_block_hashes=hashes[:-1], hash_bytes=size)
    with pytest.raises(InvalidArgument, match=r"hash_bytes: expected 1\.\.64, got 0"):
        save(packed_block_ids=ids, packed_block_hashes=hashes)
    with pytest.raises(InvalidArgument, match=r"hash_bytes: expected 1\.\.64, got 65"):
        save(packed_block_ids=ids, packed_block_hashes=b"x" * 130, hash_bytes=65)
    with pytest.raises(InvalidArgument, match="not a whole number of uint32 ids"):
        save(packed_block_ids=ids[:-1], packed_block_hashes=hashes, hash_bytes=size)
    with pytest.raises(InvalidArgument, match="block_ids and packed_block_ids are both set"):
        save(block_ids=[0, 1], packed_block_ids=ids, packed_block_hashes=hashes, hash_bytes=size)
    with pytest.raises(InvalidArgument, match="block_hashes and packed_block_hashes are both set"):
        save(packed_block_ids=ids, block_hashes=[b"a" * 32], packed_block_hashes=hashes, hash_bytes=size)
    with pytest.raises(InvalidArgument, match="block_ids has 1 entries but block_hashes has 2"):
        save(packed_block_ids=ids[:4], packed_block_hashes=hashes, hash_bytes=size)
    with pytest.raises(InvalidArgument, match=r"block_ids\[1\] = 64 is out of range \[0, 64\)"):
        save(packed_block_ids=pack_block_ids([0, 64]), packed_block_hashes=hashes, hash_bytes=size)
    with pytest.raises(InvalidArgument, match="not a whole number of 32-byte hashes"):
        client._call("Query", pb.QueryRequest(context_id=cid, packed_block_hashes=b"x" * 33, hash_bytes=32), "query")


def test_the_client_refuses_ids_the_wire_cannot_carry(client, make_engine):
    engine = make_engine(model="bad-ids")
    with pytest.raises(InvalidArgument, match=r"block_ids\[1\] = -1: expected engine block ids in \[0, 2\*\*32\)"):
        client.save(engine.handle, [0, -1], [b"a" * 32, b"b" * 32])
    with pytest.raises(InvalidArgument, match=r"block_ids\[0\] = 1.5"):
        client.save(engine.handle, [1.5], [b"a" * 32])


def test_hashes_of_mixed_sizes_travel_in_the_repeated_form(client, make_engine):
    engine = make_engine(model="mixed")
    assert pack_hashes([b"a" * 16, b"b" * 32]) is None
    assert client.save(engine.handle, engine.allocate(2), [b"a" * 16, b"b" * 32]).stored == 2
    assert client.query(engine.handle, [b"a" * 16, b"b" * 32]).hit_blocks == 2
    with pytest.raises(InvalidArgument, match=r"block_hashes\[1\]: expected 1\.\.64 bytes"):
        client.save(engine.handle, engine.allocate(2), [b"a" * 16, b""])
