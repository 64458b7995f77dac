import time

from submitd_common.files import WatchedFile, load_yaml
from submitd_common.ids import new_queue_id


def test_queue_ids_are_unique_and_sort_by_time():
    first = [new_queue_id() for _ in range(1000)]
    time.sleep(0.002)
    later = new_queue_id()
    assert len(set(first)) == 1000
    assert all(q < later for q in first)
    assert all(len(q) == 22 and q.isalnum() and q.isupper() for q in first)


def test_watched_file_reloads_and_keeps_last_good(tmp_path):
    path = tmp_path / "users.yaml"
    path.write_text("users: {a: 1}\n")
    watched = WatchedFile(str(path), load_yaml)
    assert watched.value == {"users": {"a": 1}}
    assert not watched.reload_if_changed()

    path.write_text("users: {a: 1, b: 2}\n")
    assert watched.reload_if_changed()
    assert watched.value["users"] == {"a": 1, "b": 2}

    path.write_text("users: [unclosed\n")
    assert not watched.reload_if_changed()
    assert watched.value["users"] == {"a": 1, "b": 2}, "a broken file keeps the last good value"
    assert watched.last_error


async def test_services_starting_together_all_get_the_queue(nats_server):
    """Frontend and relay replicas create the queue at the same moment on a first install."""
    import asyncio

    import nats

    from submitd_common import jetstream

    clients = [await nats.connect(nats_server.url) for _ in range(4)]
    try:
        configs = [jetstream.QueueConfig(max_bytes=6000), jetstream.QueueConfig()] * 2
        await asyncio.gather(*(
            jetstream.ensure_queue(c.jetstream(), cfg, update=(i == 0)) for i, (c, cfg) in enumerate(zip(clients, configs))
        ))
        info = await clients[0].jetstream().stream_info(jetstream.STREAM)
        assert info.config.name == jetstream.STREAM
    finally:
        for c in clients:
            await c.close()
