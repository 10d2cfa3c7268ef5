"""The connector inside vLLM's real Scheduler, against a real daemon: hits, misses, the
last-token rule, shared prefixes, leases, preemption, a dead daemon, and exact bytes."""

from __future__ import annotations

import random

from vllm_harness import BLOCK, need_vllm

need_vllm()


def tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 999) for _ in range(n)]


def first_load(results, req_id: str) -> list[int]:
    for r in results:
        if req_id in r.loaded:
            return r.loaded[req_id]
    return []


def test_cold_miss_then_hit_of_every_full_block_but_the_last_token(make_engine, daemon, daemon_client):
    engine = make_engine(daemon.endpoint)
    prompt = tokens(BLOCK * 5, seed=1)  # exactly 5 full blocks: the 5th holds the last token
    engine.add("cold", prompt)
    cold = engine.run()
    assert first_load(cold, "cold") == [] and "cold" in engine.finished
    assert daemon_client.stats().index_blocks >= 5

    engine.scheduler.reset_prefix_cache()  # forget local hits: the next one must come from the daemon
    engine.add("warm", prompt)
    warm = engine.run()
    loaded = first_load(warm, "warm")
    assert len(loaded) == 4  # never the block of the last prompt token: vLLM must compute one token
    assert all(engine.block_matches("warm", i, b) for i, b in enumerate(loaded))
    assert daemon_client.stats().leases == 0
    # what vLLM's KV connector stats hooks reported, summed over the run
    assert engine.stats["loaded_blocks"] == 4 and engine.stats["query_hit_tokens"] == 4 * BLOCK
    assert engine.stats["stored_blocks"] >= 5 and engine.stats["load_failed_blocks"] == 0


def test_prompt_ending_past_a_block_hits_every_full_block(make_engine, daemon):
    engine = make_engine(daemon.endpoint)
    prompt = tokens(BLOCK * 5 + 3, seed=2)
    engine.add("a", prompt)
    engine.run()
    engine.scheduler.reset_prefix_cache()
    engine.add("b", prompt)
    loaded = first_load(engine.run(), "b")
    assert len(loaded) == 5 and all(engine.block_matches("b", i, blk) for i, blk in enumerate(loaded))


def test_shared_prefix_hits_exactly_the_prefix(make_engine, daemon, daemon_client):
    engine = make_engine(daemon.endpoint)
    system = tokens(BLOCK * 3, seed=3)
    engine.add("first", system + tokens(BLOCK * 2 + 4, seed=4))
    engine.run()
    engine.scheduler.reset_prefix_cache()
    engine.add("second", system + tokens(BLOCK * 2 + 4, seed=5))
    loaded = first_load(engine.run(), "second")
    assert len(loaded) == 3 and all(engine.block_matches("second", i, blk) for i, blk in enumerate(loaded))
    assert daemon_client.stats().leases == 0


def test_another_engine_instance_loads_what_the_first_computed(make_engine, daemon):
    first = make_engine(daemon.endpoint, extra={"pegaflow.instance_id": "engine-a"})
    prompt = tokens(BLOCK * 4 + 1, seed=6)
    first.add("r", prompt)
    first.run()
    second = make_engine(daemon.endpoint, extra={"pegaflow.instance_id": "engine-b"})
    second.add("r", prompt)
    loaded = first_load(second.run(), "r")
    assert len(loaded) == 4 and all(second.block_matches("r", i, blk) for i, blk in enumerate(loaded))


def test_abort_mid_prefill_releases_leases_and_held_blocks(make_engine, daemon, daemon_client):
    engine = make_engine(daemon.endpoint)
    prompt = tokens(BLOCK * 30, seed=7)  # 480 tokens: two prefill chunks of <= 256
    engine.add("long", prompt)
    engine.run()
    engine.scheduler.reset_prefix_cache()
    from vllm.v1.request import RequestStatus

    engine.add("again", prompt + tokens(BLOCK * 20, seed=8))  # hit 30 blocks, then more prefill
    step = engine.step()
    assert len(step.loaded.get("again", [])) == 30
    engine.scheduler.finish_requests("again", RequestStatus.FINISHED_ABORTED)
    engine.run()
    assert daemon_client.stats().leases == 0
    assert not engine.scheduler.requests  # held blocks were handed back once saves finished
    pool = engine.scheduler.kv_cache_manager.block_pool
    assert pool.free_block_queue.num_free_blocks == pool.num_gpu_blocks - 1


def test_preemption_releases_leases_and_every_request_finishes(make_engine, daemon, daemon_client):
    engine = make_engine(daemon.endpoint, num_blocks=14)
    prompts = {f"p{i}": tokens(BLOCK * 4 + 2, seed=10 + i) for i in range(3)}
    for req_id, prompt in prompts.items():
        engine.add(req_id, prompt, max_tokens=40)  # decodes outgrow 13 usable blocks: vLLM preempts
    results = engine.run(max_steps=400)
    assert any(r.meta.preempted_req_ids for r in results)
    assert set(prompts) <= engine.finished
    assert daemon_client.stats().leases == 0


def test_dead_daemon_means_misses_then_the_client_reconnects(make_engine, caplog):
    from pegaflow_core.client import PegaflowClient
    from pegaflow_core.launcher import DaemonProcess

    from vllm_harness import DAEMON_CONFIG

    first = DaemonProcess(DAEMON_CONFIG).start()
    endpoint = first.endpoint
    engine = make_engine(endpoint)
    first.kill()
    prompt = tokens(BLOCK * 3 + 1, seed=20)
    engine.add("down", prompt)
    assert first_load(engine.run(), "down") == [] and "down" in engine.finished  # served, no error
    engine.scheduler.reset_prefix_cache()
    engine.add("down-again", prompt)
    assert first_load(engine.run(), "down-again") == []
    outage = [r for r in caplog.records if r.name == "pegaflow.vllm" and "unavailable for the vLLM scheduler" in r.message]
    assert len(outage) == 1  # logged once, not once per request or step

    again = DaemonProcess(DAEMON_CONFIG + f"server: {{listen: '{endpoint}'}}\n").start()
    try:
        import time

        time.sleep(0.5)  # past pegaflow.retry_interval_s: the connector asks again
        engine.scheduler.reset_prefix_cache()
        engine.add("back-1", prompt)
        engine.run()
        engine.scheduler.reset_prefix_cache()
        engine.add("back-2", prompt)
        loaded = first_load(engine.run(), "back-2")
        assert len(loaded) == 3 and all(engine.block_matches("back-2", i, b) for i, b in enumerate(loaded))
        with PegaflowClient(endpoint) as c:
            assert c.stats().leases == 0
    finally:
        engine.close()
        again.close()
        first.close()


def test_cross_layer_layout_round_trips(make_engine, daemon):
    engine = make_engine(daemon.endpoint, layout="BLNHC")
    assert len(engine.worker.worker.handle.spec.planes) == 1  # one contiguous run per block, all layers
    prompt = tokens(BLOCK * 3 + 1, seed=30)
    engine.add("x", prompt)
    engine.run()
    engine.scheduler.reset_prefix_cache()
    engine.add("y", prompt)
    loaded = first_load(engine.run(), "y")
    assert len(loaded) == 3 and all(engine.block_matches("y", i, b) for i, b in enumerate(loaded))


def test_prefill_producer_and_decode_consumer_share_through_the_daemon(make_engine, daemon, daemon_client):
    producer = make_engine(daemon.endpoint, role="kv_producer", extra={"pegaflow.instance_id": "prefill"})
    consumer = make_engine(daemon.endpoint, role="kv_consumer", extra={"pegaflow.instance_id": "decode"})
    prompt = tokens(BLOCK * 6 + 7, seed=40)
    producer.add("req", prompt, max_tokens=1)  # the proxy's prefill request
    produced = producer.run()
    assert first_load(produced, "req") == []  # a producer never loads
    assert producer.worker.worker.sync_save  # its answer implies the KV is in the daemon already
    consumer.add("req", prompt, max_tokens=5)
    consumed = consumer.run()
    loaded = first_load(consumed, "req")
    assert len(loaded) == 6 and all(consumer.block_matches("req", i, b) for i, b in enumerate(loaded))
    assert not any(r.meta.save_block_ids for r in consumed)  # a consumer never saves
    assert daemon_client.stats().leases == 0


def test_a_failed_load_is_recomputed_never_served(make_engine):
    from pegaflow_core.launcher import DaemonProcess

    from vllm_harness import DAEMON_CONFIG

    with DaemonProcess(DAEMON_CONFIG) as d:
        engine = make_engine(d.endpoint)
        prompt = tokens(BLOCK * 4 + 2, seed=50)
        engine.add("a", prompt)
        engine.run()
        engine.scheduler.reset_prefix_cache()
        engine.add("b", prompt)
        step = engine.step(before_worker=d.kill)  # the hit was planned; the daemon dies before the copy
        assert len(step.loaded["b"]) == 4 and step.invalid == set(step.loaded["b"])
        engine.run()
        assert "b" in engine.finished  # vLLM recomputed the 4 blocks: same bytes as computed ones
        table = step.loaded["b"]
        assert all(engine.block_matches("b", i, blk) for i, blk in enumerate(table))
