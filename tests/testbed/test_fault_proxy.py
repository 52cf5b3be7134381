"""The fault-injecting proxy in front of real servers: moto_server (S3) and the stdlib hub."""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
import urllib3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, ConnectionClosedError, ReadTimeoutError
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

from nimflow.testbed.fault_proxy import FaultProxy, hub_error, s3_error
from nimflow.testbed.hub_server import HubServer, publish
from nimflow.testbed.tiny_model import write_tiny_llama

pytestmark = pytest.mark.testbed

#: What a client sees when the proxy cuts a body short: botocore's read/connection errors, or
#: urllib3's protocol error where botocore does not wrap it.
CUT_SHORT = (BotoCoreError, urllib3.exceptions.HTTPError)

BUCKET = "nimflow-test"
MOTO = Path(sys.executable).with_name("moto_server")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    port = _free_port()
    proc = subprocess.Popen([str(MOTO), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "moto_server did not start"
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def s3_proxy(moto_url: str) -> Iterator[FaultProxy]:
    with FaultProxy(moto_url) as proxy:
        yield proxy


def _s3(url: str, **config: object):  # noqa: ANN202 - boto3 client types are generated
    return boto3.client("s3", endpoint_url=url, aws_access_key_id="test", aws_secret_access_key="test",
                        region_name="us-east-1", config=Config(**config))


@pytest.fixture
def bucket(s3_proxy: FaultProxy) -> str:
    _s3(s3_proxy.url).create_bucket(Bucket=BUCKET)
    s3_proxy.clear_requests()
    return BUCKET


def test_injected_s3_503_without_retries(s3_proxy: FaultProxy, bucket: str) -> None:
    # botocore: `max_attempts` counts *retries* (total = max_attempts + 1); `total_max_attempts` counts tries.
    s3 = _s3(s3_proxy.url, retries={"total_max_attempts": 1})
    s3_proxy.add_fault(method="PUT", path_pattern=rf"^/{bucket}/a\.txt", **s3_error()._asdict())
    with pytest.raises(ClientError) as exc:
        s3.put_object(Bucket=bucket, Key="a.txt", Body=b"first")
    assert exc.value.response["Error"]["Code"] == "ServiceUnavailable"
    assert exc.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    assert s3_proxy.pending_faults == 0
    s3.put_object(Bucket=bucket, Key="a.txt", Body=b"second")
    assert s3.get_object(Bucket=bucket, Key="a.txt")["Body"].read() == b"second"
    assert s3_proxy.requests == [("PUT", f"/{bucket}/a.txt", 503, True), ("PUT", f"/{bucket}/a.txt", 200, False),
                                 ("GET", f"/{bucket}/a.txt", 200, False)]


@pytest.mark.parametrize("config,faults,attempts", [
    ({"retries": {"max_attempts": 1}}, 1, 2),  # max_attempts=1 still retries once
    ({}, 2, 3),  # botocore 1.44 default: standard mode, 3 attempts in total
])
def test_botocore_retries_through_the_proxy(s3_proxy: FaultProxy, bucket: str, config: dict, faults: int,
                                            attempts: int) -> None:
    s3 = _s3(s3_proxy.url, **config)
    s3_proxy.add_fault(method="PUT", path_pattern="/k$", count=faults, **s3_error("SlowDown")._asdict())
    s3.put_object(Bucket=bucket, Key="k", Body=b"v")
    assert [r[2:] for r in s3_proxy.requests] == [(503, True)] * faults + [(200, False)]
    assert len(s3_proxy.requests) == attempts


def test_multipart_upload_round_trips_with_a_retried_part(s3_proxy: FaultProxy, bucket: str, tmp_path: Path) -> None:
    src = tmp_path / "engine.bin"
    src.write_bytes(os.urandom(12 * 1024 * 1024 + 12345))
    s3 = _s3(s3_proxy.url)  # default retries absorb the injected failure on part 2
    s3_proxy.add_fault(method="PUT", path_pattern=r"partNumber=2(&|$)", **s3_error("InternalError")._asdict())
    cfg = TransferConfig(multipart_threshold=5 * 1024 * 1024, multipart_chunksize=5 * 1024 * 1024)
    s3.upload_file(str(src), bucket, "engine.bin", Config=cfg)
    s3.download_file(bucket, "engine.bin", str(tmp_path / "back.bin"), Config=cfg)
    assert (tmp_path / "back.bin").read_bytes() == src.read_bytes()
    parts = [r for r in s3_proxy.requests if r[0] == "PUT" and "partNumber=" in r[1]]
    assert len(parts) == 4 and sum(r[3] for r in parts) == 1  # 3 parts + 1 retry
    assert s3.head_object(Bucket=bucket, Key="engine.bin")["ETag"].endswith('-3"')


def test_chunked_request_body_is_forwarded(s3_proxy: FaultProxy, bucket: str) -> None:
    conn = http.client.HTTPConnection(s3_proxy.url.removeprefix("http://"))
    conn.request("PUT", f"/{bucket}/chunked", body=iter([b"abc", b"", b"defg" * 1000]), encode_chunked=True)
    r = conn.getresponse()
    r.read()
    assert r.status == 200
    s3_proxy.add_fault(path_pattern="/drained$", status=500, body=b"nope", headers={"X-Test": "1"})
    conn.request("PUT", f"/{bucket}/drained", body=iter([b"x" * 70000]), encode_chunked=True)
    r = conn.getresponse()  # the injected answer; the chunked body was drained, so the connection lives on
    assert (r.status, r.read(), r.getheader("X-Test")) == (500, b"nope", "1")
    conn.close()
    body = _s3(s3_proxy.url).get_object(Bucket=bucket, Key="chunked")["Body"].read()
    assert body == b"abc" + b"defg" * 1000


def test_dropped_connection_and_delay(s3_proxy: FaultProxy, bucket: str) -> None:
    s3 = _s3(s3_proxy.url, retries={"total_max_attempts": 1}, read_timeout=0.3)
    s3_proxy.add_fault(method="PUT", path_pattern="/dropped$", drop=True)
    with pytest.raises(ConnectionClosedError):
        s3.put_object(Bucket=bucket, Key="dropped", Body=b"x")
    s3_proxy.add_fault(method="GET", path_pattern=r"/slow$", delay=1.0, **s3_error()._asdict())
    with pytest.raises(ReadTimeoutError):
        s3.get_object(Bucket=bucket, Key="slow")
    assert [(r[2], r[3]) for r in s3_proxy.requests] == [(0, True)]  # the slow one was still sleeping


def test_unreachable_upstream_is_a_502() -> None:
    with FaultProxy(f"http://127.0.0.1:{_free_port()}") as proxy:
        conn = http.client.HTTPConnection(proxy.url.removeprefix("http://"))
        conn.request("GET", "/anything")
        r = conn.getresponse()
        assert r.status == 502 and b"upstream error" in r.read()
        assert proxy.requests == [("GET", "/anything", 502, False)]


@pytest.fixture
def hub_proxy(tmp_path: Path) -> Iterator[tuple[FaultProxy, str]]:
    sha = publish(tmp_path / "hub", "acme/tiny", write_tiny_llama(tmp_path / "src"))
    with HubServer(tmp_path / "hub") as hub, FaultProxy(hub.url) as proxy:
        yield proxy, sha


def test_hub_503_on_get_resolve_is_not_retried(hub_proxy: tuple[FaultProxy, str], tmp_path: Path) -> None:
    proxy, sha = hub_proxy
    proxy.add_fault(method="GET", path_pattern=r"/resolve/.*/config\.json$", **hub_error()._asdict())
    with pytest.raises(HfHubHTTPError) as exc:
        snapshot_download("acme/tiny", revision=sha, endpoint=proxy.url, cache_dir=tmp_path / "c")
    assert exc.value.response.status_code == 503
    gets = [r for r in proxy.requests if r[0] == "GET" and r[1].endswith("/config.json")]
    assert gets == [("GET", f"/acme/tiny/resolve/{sha}/config.json", 503, True)]  # no internal retry
    out = snapshot_download("acme/tiny", revision=sha, endpoint=proxy.url, cache_dir=tmp_path / "c")
    assert (Path(out) / "config.json").read_bytes() == (tmp_path / "src" / "config.json").read_bytes()


def test_hub_503_on_head_resolve_is_retried(hub_proxy: tuple[FaultProxy, str], tmp_path: Path) -> None:
    proxy, sha = hub_proxy
    proxy.add_fault(method="HEAD", path_pattern=r"/resolve/", **hub_error()._asdict())
    path = hf_hub_download("acme/tiny", "config.json", revision=sha, endpoint=proxy.url, cache_dir=tmp_path / "c")
    assert Path(path).is_file()
    assert [(r[0], r[2], r[3]) for r in proxy.requests] == [("HEAD", 503, True), ("HEAD", 200, False),
                                                            ("GET", 200, False)]


def test_hub_503_on_revision_call(hub_proxy: tuple[FaultProxy, str], tmp_path: Path) -> None:
    proxy, sha = hub_proxy
    proxy.add_fault(method="GET", path_pattern=r"/revision/main$", count=2, **hub_error()._asdict())
    with pytest.raises(HfHubHTTPError) as exc:  # model_info: raised as is, no retry
        HfApi(endpoint=proxy.url).model_info("acme/tiny", revision="main")
    assert exc.value.response.status_code == 503
    # snapshot_download swallows API errors to try the local cache; with nothing cached it raises
    # LocalEntryNotFoundError (not an HfHubHTTPError) chained to the 503.
    with pytest.raises(LocalEntryNotFoundError) as exc2:
        snapshot_download("acme/tiny", revision="main", endpoint=proxy.url, cache_dir=tmp_path / "c")
    assert isinstance(exc2.value.__cause__, HfHubHTTPError) and exc2.value.__cause__.response.status_code == 503
    assert [r[2:] for r in proxy.requests] == [(503, True), (503, True)]
    assert HfApi(endpoint=proxy.url).model_info("acme/tiny", revision="main").sha == sha


def test_reset_after_n_bytes_of_a_response_and_of_a_request(s3_proxy: FaultProxy, bucket: str) -> None:
    s3 = _s3(s3_proxy.url, retries={"total_max_attempts": 1})
    s3.put_object(Bucket=bucket, Key="big", Body=b"x" * 300_000)
    s3_proxy.add_reset(100_000, method="GET", path_pattern="/big$")
    body = s3.get_object(Bucket=bucket, Key="big")["Body"]
    with pytest.raises(CUT_SHORT):  # the body ends early
        body.read()
    s3_proxy.add_reset(10_000, method="PUT", path_pattern="/cut$", of="request")
    with pytest.raises(CUT_SHORT):
        s3.put_object(Bucket=bucket, Key="cut", Body=b"y" * 200_000)
    assert s3.get_object(Bucket=bucket, Key="big")["Body"].read() == b"x" * 300_000
    exchanges = [(e.method, e.status, e.fault, e.request_bytes, e.response_bytes) for e in s3_proxy.exchanges]
    assert exchanges == [("PUT", 200, None, 300_000, 0), ("GET", 200, "reset", 0, 100_000), ("PUT", 0, "reset", 10_000, 0),
                         ("GET", 200, None, 0, 300_000)]
    assert "cut" not in [k["Key"] for k in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]  # nothing half-written


def test_latency_forwards_and_a_hang_lasts_until_the_client_gives_up(s3_proxy: FaultProxy, bucket: str) -> None:
    s3 = _s3(s3_proxy.url, retries={"total_max_attempts": 1}, read_timeout=1)
    s3_proxy.add_latency(0.2, method="PUT")
    s3.put_object(Bucket=bucket, Key="late", Body=b"v")
    s3_proxy.add_hang(method="GET", path_pattern="/late$")
    with pytest.raises(ReadTimeoutError):
        s3.get_object(Bucket=bucket, Key="late")
    assert s3.get_object(Bucket=bucket, Key="late")["Body"].read() == b"v"  # one request hung, the next is served
    deadline = time.monotonic() + 10
    while s3_proxy.hanging and time.monotonic() < deadline:
        time.sleep(0.05)  # the proxy notices the client's hang-up on its next poll
    assert s3_proxy.hanging == 0
    assert sorted(((e.method, e.status, e.fault) for e in s3_proxy.exchanges), key=str) == [
        ("GET", 0, "hang"), ("GET", 200, None), ("PUT", 200, "latency")]


def test_a_hang_is_released_when_the_proxy_stops(moto_url: str) -> None:
    proxy = FaultProxy(moto_url)
    proxy.start()
    proxy.add_hang()
    conn = http.client.HTTPConnection(proxy.url.removeprefix("http://"), timeout=30)
    conn.request("GET", "/anything")
    deadline = time.monotonic() + 10
    while not proxy.hanging and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proxy.hanging == 1
    proxy.stop()
    with pytest.raises((http.client.HTTPException, OSError)):
        conn.getresponse()  # closed without an answer, long before the client's 30 s timeout
    conn.close()


def test_stripped_headers_make_a_store_that_ignores_conditions_and_has_no_clock(s3_proxy: FaultProxy, bucket: str) -> None:
    """Stripped request headers never reach moto (a conditional write becomes a plain one); stripped response
    headers never reach the client. Without stripping, the same requests are refused (412)."""
    s3 = _s3(s3_proxy.url, retries={"total_max_attempts": 1})
    s3.put_object(Bucket=bucket, Key="cond", Body=b"v1")
    with pytest.raises(ClientError) as refused:
        s3.put_object(Bucket=bucket, Key="cond", Body=b"v2", IfNoneMatch="*")
    assert refused.value.response["Error"]["Code"] == "PreconditionFailed"

    s3_proxy.strip_headers(request=("If-None-Match", "if-match"), response=("Date",))
    s3.put_object(Bucket=bucket, Key="cond", Body=b"v2", IfNoneMatch="*")
    answer = s3.put_object(Bucket=bucket, Key="cond", Body=b"v3", IfMatch='"not-the-etag"')
    assert s3.get_object(Bucket=bucket, Key="cond")["Body"].read() == b"v3"
    assert "date" not in answer["ResponseMetadata"]["HTTPHeaders"]

    s3_proxy.strip_headers()  # back to forwarding everything
    with pytest.raises(ClientError):
        s3.put_object(Bucket=bucket, Key="cond", Body=b"v4", IfNoneMatch="*")
    assert "date" in s3.get_object(Bucket=bucket, Key="cond")["ResponseMetadata"]["HTTPHeaders"]
