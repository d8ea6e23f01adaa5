"""A real S3-compatible server on loopback for tests: moto's, in a thread of the test process.

Every process that should reach it (Ray workers included) needs ``env`` in its environment: the
endpoint, dummy credentials, a region, and no EC2 metadata lookups (they time out off AWS).
"""

from __future__ import annotations

import io
import logging
import os
from contextlib import contextmanager
from pathlib import Path

BUCKET = "cxr-test"


@contextmanager
def s3_server(bucket: str = BUCKET):
    """Yields the AWS_* variables for a fresh server with ``bucket`` created; stops it afterwards."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
               "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
        client(env).create_bucket(Bucket=bucket)
        yield env
    finally:
        server.stop()


def client(env: dict):
    import boto3

    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_REGION"],
                        aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])


def upload_tree(env: dict, local: Path, prefix: str, bucket: str = BUCKET) -> str:
    """Copy a local folder to s3://bucket/prefix with boto3 (not the code under test); -> the URI."""
    s3 = client(env)
    for path in sorted(Path(local).rglob("*")):
        if path.is_file():
            s3.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(local).as_posix()}")
    return f"s3://{bucket}/{prefix}"


def put_many(env: dict, bucket: str, objects) -> None:
    """Create ``bucket`` over HTTP and put ``(key, bytes)`` pairs straight into the server's store.

    For archives of tens of thousands of keys: moto serves a PUT in about 6 ms of Python, so 50,000
    of them over HTTP take 5 minutes on 2 CPUs; its own put_object takes 3 s. Everything the code
    under test does (listing, reading, writing) still goes over HTTP. The server must run in this
    process (``s3_server`` does)."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    client(env).create_bucket(Bucket=bucket)
    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    for key, data in objects:
        backend.put_object(bucket, key, data)


def keys(env: dict, prefix: str, bucket: str = BUCKET) -> list[str]:
    out = []
    for page in client(env).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out += [o["Key"] for o in page.get("Contents", [])]
    return sorted(out)


def get(env: dict, uri_or_key: str, bucket: str = BUCKET) -> bytes:
    key = uri_or_key.removeprefix(f"s3://{bucket}/")
    return client(env).get_object(Bucket=bucket, Key=key)["Body"].read()


def read_parquet_folder(env: dict, prefix: str, bucket: str = BUCKET):
    """All part-*.parquet files under prefix as one pyarrow table, read with boto3 + pyarrow."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = [k for k in keys(env, prefix.rstrip("/") + "/", bucket) if k.endswith(".parquet")]
    return pa.concat_tables([pq.read_table(io.BytesIO(get(env, k, bucket))) for k in parts]), parts


def subprocess_env(env: dict, **extra: str) -> dict:
    """The test process's environment plus ``env``, minus anything that would join another Ray."""
    out = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "AWS_"))}
    out.update(env)
    out.update(extra)
    return out
