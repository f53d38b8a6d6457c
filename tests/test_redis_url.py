"""farm's Redis URLs (farm/redis_url.py): plain and Sentinel URLs parsed, refused with a
reason, spelled for Celery, masked; and clients made from them reaching a real master
through a real sentinel."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from farm import redis_url
from farm.broker import make_app
from farm.config import Settings, masked
from farm.errors import ConfigError
from tests.sentinel import MASTER_NAME, SentinelSet

URL = "sentinel://:s3cret@h1:26380/2;sentinel://h2?master_name=mymaster"


def test_a_sentinel_url_names_its_sentinels_master_database_and_password():
    s = redis_url.parse_sentinel(URL)
    assert s.sentinels == (("h1", 26380), ("h2", 26379))
    assert (s.master, s.db, s.username, s.password) == ("mymaster", 2, None, "s3cret")
    assert redis_url.is_sentinel(URL) and not redis_url.is_sentinel("redis://h:6379/0")


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("sentinel://h1:26379;sentinel://h2:26379", "names no master: add ?master_name=NAME"),
        ("sentinel://h1:26379;redis://h2:6379?master_name=m", "every part is sentinel://"),
        ("sentinel://h1:26379?master_name=m&ssl=true", "unknown option 'ssl'"),
        ("sentinel://h1:26379/zero?master_name=m", "the database must be a number"),
        ("sentinel://h1/1;sentinel://h2/2?master_name=m", "different databases"),
        ("sentinel://h1?master_name=a;sentinel://h2?master_name=b", "different master names"),
        ("sentinel://:26379?master_name=m", "names no sentinel host"),
        ("sentinel://h1:port?master_name=m", "port is not a number"),
    ],
)
def test_a_sentinel_url_farm_cannot_use_is_refused_saying_what_to_write(url: str, says: str):
    with pytest.raises(ConfigError) as e:
        Settings(broker_url=url).resolved_broker_url()
    assert str(e.value).startswith("FARM_BROKER_URL: not a Sentinel URL farm can use")
    assert says in str(e.value) and "e.g. sentinel://" in str(e.value)


def test_a_bad_result_url_is_refused_under_its_own_name():
    with pytest.raises(ConfigError, match="^FARM_RESULT_URL: "):
        Settings(result_url="sentinel://h1:26379").resolved_result_url()


def test_celery_gets_its_own_form_with_the_master_in_the_transport_options():
    url, options = redis_url.for_celery(URL)
    assert url == "sentinel://:s3cret@h1:26380/2;sentinel://h2:26379"
    assert options["master_name"] == "mymaster"
    assert options["sentinel_kwargs"]["retry"].get_retries() == 0  # a sentinel down: the next
    assert redis_url.for_celery("redis://h:6379/1") == ("redis://h:6379/1", {})
    app = make_app(Settings(), URL)
    try:
        assert app.conf.broker_transport == "farm.broker:SentinelTransport"
        assert app.conf.broker_transport_options["master_name"] == "mymaster"
        assert app.conf.result_backend_transport_options["master_name"] == "mymaster"
        assert type(app.backend).__name__ == "SentinelResultBackend"
    finally:
        app.close()


def test_every_sentinels_password_is_masked():
    assert masked("sentinel://:pw@h1:26379/0;sentinel://:pw@h2:26379?master_name=m") == (
        "sentinel://:***@h1:26379/0;sentinel://:***@h2:26379?master_name=m"
    )


def test_clients_from_a_sentinel_url_reach_the_master_and_its_database(tmp_path: Path):
    servers = SentinelSet(tmp_path, replica=False).start()
    try:
        url = servers.url(db=3)  # a sentinel nobody runs comes first in it
        with redis_url.client(url, connect_timeout=1, decode_responses=True) as r:
            r.set("farm:test:key", "through the sentinel")
        direct = f"redis://127.0.0.1:{servers.master_port}/3"
        with redis_url.client(direct, connect_timeout=1, decode_responses=True) as plain:
            assert plain.get("farm:test:key") == "through the sentinel"

        async def read() -> str | None:
            a = redis_url.async_client(
                url, connect_timeout=1, max_connections=2, decode_responses=True
            )
            try:
                return await a.get("farm:test:key")
            finally:
                await a.aclose()

        assert asyncio.run(read()) == "through the sentinel"
        assert servers.master_now() == servers.master_port
        assert MASTER_NAME in url
    finally:
        servers.stop()
