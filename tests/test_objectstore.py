"""The S3-compatible blob store against a real S3 server (moto's server in a subprocess, over HTTP)."""

from __future__ import annotations

import hashlib
import json
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from pydantic import ValidationError

from aftermath.coordinator.blobs import BlobTooLarge, StorageFull
from aftermath.coordinator.objectstore import ObjectStoreError, S3BlobStore
from aftermath.runconfig import StorageSection
from aftermath.errors import AftermathError, PayloadError
from support.s3server import ACCESS_KEY, SECRET_KEY, S3Server, closed_port

MAX = 4096


def blob(text: str | bytes) -> tuple[str, bytes]:
    data = text.encode() if isinstance(text, str) else text
    return hashlib.sha256(data).hexdigest(), data


@pytest.fixture(scope="module")
def s3():
    with S3Server() as server:
        yield server


@pytest.fixture
def bucket(s3):
    return s3.create_bucket()


def open_store(s3, bucket, **fields) -> S3BlobStore:
    section = StorageSection(backend="s3", endpoint_url=s3.endpoint_url, bucket=bucket, **fields)
    return S3BlobStore.from_section(section, MAX, session=s3.session(), connect_timeout=2, max_attempts=2)


def keys(s3, bucket) -> list[str]:
    answer = s3.client().list_objects_v2(Bucket=bucket)
    return sorted(obj["Key"] for obj in answer.get("Contents", []))


def fetch(url: str) -> tuple[int, bytes]:
    """GET without credentials: (status, body)."""
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_round_trip(s3, bucket):
    store = open_store(s3, bucket, prefix="runs/a/")
    sha, data = blob("hello blob")
    assert store.total_bytes == 0 and not store.has(sha)
    assert store.put(sha, data) is True
    assert store.has(sha) and store.get(sha) == data and store.size(sha) == len(data)
    assert store.total_bytes == len(data)
    assert keys(s3, bucket) == [f"runs/a/blobs/{sha[:2]}/{sha}"]

    sha2, data2 = blob(b"\x00\x01" * 100)
    assert store.put(sha2, data2)
    assert store.total_bytes == len(data) + len(data2)
    store.delete(sha)
    assert not store.has(sha) and store.has(sha2) and store.total_bytes == len(data2)
    with pytest.raises(KeyError):
        store.get(sha)
    with pytest.raises(KeyError):
        store.size(sha)
    store.delete(sha)  # absent: no error, accounting unchanged
    assert store.total_bytes == len(data2)

    store.clear()
    assert store.total_bytes == 0 and not store.has(sha2) and keys(s3, bucket) == []
    assert not store.has("not-a-sha")
    with pytest.raises(PayloadError, match="not a sha256"):
        store.get("../../etc/passwd")


def test_put_is_idempotent(s3, bucket):
    store = open_store(s3, bucket)
    sha, data = blob("same bytes")
    assert store.put(sha, data) is True
    before = s3.client().head_object(Bucket=bucket, Key=store.key(sha))["LastModified"]
    time.sleep(1.05)  # LastModified has a one-second resolution: a second upload would move it
    assert store.put(sha, data) is False
    assert s3.client().head_object(Bucket=bucket, Key=store.key(sha))["LastModified"] == before
    assert store.total_bytes == len(data)


def test_refusals_store_nothing(s3, bucket):
    store = open_store(s3, bucket)
    sha, data = blob("genuine")
    with pytest.raises(PayloadError, match="hash to"):
        store.put(sha, data + b"tampered")
    with pytest.raises(PayloadError, match="not a sha256"):
        store.put("ABC", data)
    big_sha, big = blob(b"x" * (MAX + 1))
    with pytest.raises(BlobTooLarge, match="network.max_blob_bytes"):
        store.put(big_sha, big)
    assert keys(s3, bucket) == [] and store.total_bytes == 0 and not store.has(sha)


def test_storage_cap_and_accounting_across_instances(s3, bucket):
    store = open_store(s3, bucket, prefix="p/")
    shas = []
    for i in range(3):
        sha, data = blob(bytes([i]) * 1000)
        assert store.put(sha, data, storage_cap=3000)
        shas.append(sha)
    assert store.total_bytes == 3000
    sha, data = blob(b"z")
    with pytest.raises(StorageFull, match="max_blob_storage_bytes"):
        store.put(sha, data, storage_cap=3000)
    assert not store.has(sha) and store.total_bytes == 3000
    assert store.put(shas[0], bytes([0]) * 1000, storage_cap=3000) is False  # present: no cap check, no change

    again = open_store(s3, bucket, prefix="p/")  # a restarted coordinator counts what the bucket holds
    assert again.total_bytes == 3000
    again.delete(shas[1])
    assert again.total_bytes == 2000
    assert again.put(sha, data, storage_cap=3000)
    assert open_store(s3, bucket, prefix="p/").total_bytes == 2001


def test_concurrent_puts_respect_the_cap(s3, bucket):
    """The event loop thread and a worker thread put at once: the cap holds, and the accounting stays exact."""
    store = open_store(s3, bucket)
    blobs = [blob(bytes([i]) * 1000) for i in range(8)]

    def put(item):
        try:
            return store.put(*item, storage_cap=3000)
        except StorageFull:
            return "full"

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(put, blobs))
    assert results.count(True) == 3 and results.count("full") == 5
    assert store.total_bytes == 3000 and len(keys(s3, bucket)) == 3


def test_total_bytes_and_clear_page_through_listings(s3, bucket):
    """More objects than one ListObjectsV2 page (1000) and one DeleteObjects batch (1000)."""
    client = s3.client()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: client.put_object(Bucket=bucket, Key=f"many/blobs/{i % 256:02x}/obj{i}", Body=b"ab"),
                      range(1005)))
    store = open_store(s3, bucket, prefix="many/")
    assert store.total_bytes == 2010
    store.clear()
    assert keys(s3, bucket) == [] and store.total_bytes == 0


def test_prefixes_are_separate(s3, bucket):
    one, two = open_store(s3, bucket, prefix="runs/one/"), open_store(s3, bucket, prefix="runs/two/")
    sha, data = blob("only in one")
    one.put(sha, data)
    assert one.has(sha) and not two.has(sha) and two.total_bytes == 0
    with pytest.raises(KeyError):
        two.get(sha)
    two_sha, two_data = blob("only in two")
    two.put(two_sha, two_data)
    two.clear()
    assert one.has(sha) and one.get(sha) == data
    assert open_store(s3, bucket, prefix="runs/one/").total_bytes == len(data)
    assert open_store(s3, bucket, prefix="runs/two/").total_bytes == 0


def test_presigned_url_serves_the_bytes_without_credentials(s3, bucket):
    store = open_store(s3, bucket, prefix="r/", presign_seconds=60)
    sha, data = blob(os.urandom(3000))
    store.put(sha, data)
    url = store.download_url(sha)
    assert url.startswith(f"{s3.endpoint_url}/{bucket}/r/blobs/{sha[:2]}/{sha}?")
    assert "X-Amz-Signature=" in url and "X-Amz-Expires=60" in url
    assert ACCESS_KEY not in url.split("X-Amz-Credential=")[0] and SECRET_KEY not in url.split("?")[0]
    assert fetch(url) == (200, data)
    assert fetch(url.split("?")[0])[0] == 403  # the bucket is private: the signed query is what lets clients in

    store.delete(sha)
    status, _ = fetch(url)
    assert status in (403, 404)


def test_public_base_url(s3, bucket):
    s3.client().put_bucket_policy(Bucket=bucket, Policy=json.dumps({  # a publicly readable bucket
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Principal": "*", "Action": "s3:GetObject",
                       "Resource": f"arn:aws:s3:::{bucket}/*"}]}))
    base = f"{s3.endpoint_url}/{bucket}"
    store = open_store(s3, bucket, prefix="pub/", public_base_url=base + "/")
    sha, data = blob("public bytes")
    store.put(sha, data)
    assert store.download_url(sha) == f"{base}/pub/blobs/{sha[:2]}/{sha}"
    assert fetch(store.download_url(sha)) == (200, data)


def test_missing_bucket_is_a_clear_error(s3):
    with pytest.raises(ObjectStoreError) as caught:
        open_store(s3, "no-such-bucket-here")
    message = str(caught.value)
    assert "bucket 'no-such-bucket-here' does not exist" in message and s3.endpoint_url in message
    assert "storage.bucket" in message and "\n" not in message
    assert isinstance(caught.value, AftermathError)


def test_unreachable_endpoint_is_a_clear_error_quickly():
    port = closed_port()
    section = StorageSection(backend="s3", endpoint_url=f"http://127.0.0.1:{port}", bucket="b")
    started = time.monotonic()
    with pytest.raises(ObjectStoreError) as caught:
        S3BlobStore.from_section(section, MAX, session=S3Server().session(), connect_timeout=1, max_attempts=1)
    assert time.monotonic() - started < 5
    message = str(caught.value)
    assert message.startswith(f"cannot reach the object store at http://127.0.0.1:{port}")
    assert "storage.endpoint_url" in message and "credentials" in message and "\n" not in message


def test_missing_credentials_is_a_clear_error(monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(ObjectStoreError, match="no credentials .* set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
        S3BlobStore("b", MAX, endpoint_url=f"http://127.0.0.1:{closed_port()}", max_attempts=1)


def test_the_s3_store_takes_its_credentials_from_the_environment(s3, bucket, monkeypatch):
    # as the coordinator does: never from the run config, which clients can read
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    remote = S3BlobStore.from_section(StorageSection(backend="s3", endpoint_url=s3.endpoint_url, bucket=bucket,
                                                     prefix="env/"), MAX)
    assert remote.max_bytes == MAX
    sha, data = blob("via env credentials")
    assert remote.put(sha, data) and remote.get(sha) == data


def test_storage_section_validation():
    assert StorageSection().backend == "coordinator"
    with pytest.raises(ValidationError, match="storage.bucket"):
        StorageSection(backend="s3")
    with pytest.raises(ValidationError, match="extra"):
        StorageSection(backend="s3", bucket="b", access_key="AKIA...")  # credentials are not config
    with pytest.raises(ValidationError, match="storage.prefix"):
        StorageSection(backend="s3", bucket="b", prefix="runs/x")
    with pytest.raises(ValidationError, match="storage.endpoint_url"):
        StorageSection(backend="s3", bucket="b", endpoint_url="minio:9000")
    with pytest.raises(ValidationError):
        StorageSection(backend="gcs")
    with pytest.raises(ValidationError):
        StorageSection(presign_seconds=0)
    section = StorageSection(backend="s3", bucket="b", prefix="runs/x/")
    with pytest.raises(ValidationError):
        section.bucket = "other"  # frozen
    assert StorageSection.model_validate(section.model_dump()) == section
