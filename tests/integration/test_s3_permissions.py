"""Credentials without s3:ListBucket (or s3:GetObject): nimflow fails at once, naming the permission.

moto's IAM enforcement (``INITIAL_NO_AUTH_ACTION_COUNT``) can deny an action, but it still answers
a missing key with 404 whatever the policy; real S3 answers 403 to credentials that may not list
the bucket. So these tests put a small HTTP proxy in front of the real moto server that applies
that S3 rule (documented under "Permissions" of GetObject/HeadObject in the S3 API reference):
list requests get 403 AccessDenied, and a 404 for an object becomes 403 AccessDenied. Every
request is real HTTP from real botocore; everything the policy allows is answered by moto.
"""

from __future__ import annotations

import http.client
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest

from nimflow.build_lease import BuildLeases
from nimflow.engine_store import EngineStore
from nimflow.errors import EngineStoreError, is_transient
from nimflow.spec import CacheSpec
from nimflow.testbed.services import S3_TEST_CREDENTIALS
from tests.conftest import ENGINE_BUCKET

ACCESS_DENIED = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
    b"<Message>Access Denied</Message><RequestId>nimflow-test</RequestId></Error>"
)


class PolicyProxy:
    """Forwards to moto, answering as S3 does under a policy without ``denied`` (ListBucket or GetObject)."""

    def __init__(self, upstream: str, denied: str) -> None:
        target = urlsplit(upstream)
        proxy = self
        self.denied = denied
        self.refused: list[str] = []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _deny(self) -> None:
                proxy.refused.append(f"{self.command} {self.path}")
                self.send_response(403)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(ACCESS_DENIED)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(ACCESS_DENIED)

            def _forward(self) -> None:
                path = urlsplit(self.path).path.strip("/")
                is_object = "/" in path
                if self.command == "GET" and not is_object and proxy.denied == "ListBucket":
                    return self._deny()  # ListObjects(V2) of the bucket
                if self.command in ("GET", "HEAD") and is_object and proxy.denied == "GetObject":
                    return self._deny()
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                answer = conn.getresponse()
                data = answer.read()
                conn.close()
                if answer.status == 404 and is_object and self.command in ("GET", "HEAD") and proxy.denied == "ListBucket":
                    return self._deny()  # S3 hides whether the key exists from who may not list
                self.send_response(answer.status)
                for key, value in answer.getheaders():
                    if key.lower() not in ("connection", "transfer-encoding", "content-length", "server", "date"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> PolicyProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in S3_TEST_CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)


@pytest.fixture
def no_list(s3_server, aws_env) -> Iterator[PolicyProxy]:  # noqa: ANN001
    with PolicyProxy(s3_server.url, "ListBucket") as proxy:
        yield proxy


def _store(endpoint: str, prefix: str) -> EngineStore:
    return EngineStore(CacheSpec(uri=f"s3://{ENGINE_BUCKET}/{prefix}", endpoint_url=endpoint))


def test_the_proxy_answers_like_s3_without_list_bucket(no_list: PolicyProxy, unique: str) -> None:
    """The stand-in is faithful where it matters: 403 for a missing key and for listing, data otherwise."""
    from botocore.exceptions import ClientError

    client = _store(no_list.url, unique).client
    with pytest.raises(ClientError) as missing:
        client.get_object(Bucket=ENGINE_BUCKET, Key=f"{unique}/nothing-here")
    assert missing.value.response["Error"]["Code"] == "AccessDenied"
    client.put_object(Bucket=ENGINE_BUCKET, Key=f"{unique}/there", Body=b"x")
    assert client.get_object(Bucket=ENGINE_BUCKET, Key=f"{unique}/there")["Body"].read() == b"x"
    with pytest.raises(ClientError):
        client.list_objects_v2(Bucket=ENGINE_BUCKET, Prefix=unique)


def test_a_first_build_without_list_bucket_fails_at_the_manifest_lookup_naming_it(
    no_list: PolicyProxy, s3_server, unique: str  # noqa: ANN001
) -> None:
    key = "ab" * 32
    store = _store(no_list.url, unique)
    with pytest.raises(EngineStoreError) as failed:
        store.manifest(key)  # the first store call of a build: before any GPU time is spent
    message = str(failed.value)
    assert f"s3:ListBucket on arn:aws:s3:::{ENGINE_BUCKET}" in message
    assert f"s3://{ENGINE_BUCKET}/{unique}/{key}/manifest.json" in message
    assert "IAM policy" in message
    assert not is_transient(failed.value)  # permanent: retrying cannot grant a permission

    with pytest.raises(EngineStoreError, match=r"s3:ListBucket on arn:aws:s3:::"):
        BuildLeases(store, 60).live_holder(key)  # the lease read classifies the same 403 the same way

    # With the same bucket reachable with ListBucket (moto directly), the key is simply not there.
    assert _store(s3_server.url, unique).manifest(key) is None


def test_without_get_object_a_published_engine_is_not_mistaken_for_a_missing_one(
    s3_server, aws_env, unique: str  # noqa: ANN001
) -> None:
    key = "cd" * 32
    direct = _store(s3_server.url, unique)
    direct.client.put_object(Bucket=ENGINE_BUCKET, Key=direct.object_key(key, "manifest.json"), Body=b"{}")
    with PolicyProxy(s3_server.url, "GetObject") as proxy:
        with pytest.raises(EngineStoreError) as failed:
            _store(proxy.url, unique).manifest(key)
    assert f"s3:GetObject on arn:aws:s3:::{ENGINE_BUCKET}/{unique}/{key}/manifest.json" in str(failed.value)
    assert "exists" in str(failed.value)
