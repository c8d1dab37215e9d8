"""Object storage: AWS S3 or any S3-compatible server, reached the same way by pyarrow (landing
files, the catalog file) and by DuckDB (the lake's data, through the httpfs extension's wheel).

The keys are secrets: given to DuckDB as parameters of its secret (never in SQL text), kept out
of every repr, and never written into metadata or logs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urlsplit

import duckdb

SCHEME = "s3://"


def is_uri(path: object) -> bool:
    """Whether `path` names an object (`s3://bucket/key`) rather than a local path."""
    return str(path).startswith(SCHEME)


def join(base: str, *parts: str) -> str:
    """`base` and `parts` joined with '/', for URIs and local paths alike (pathlib would fold
    `s3://` into `s3:/`)."""
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def pyarrow_path(uri: str) -> str:
    """`bucket/key`, as pyarrow's S3 filesystem names `s3://bucket/key`."""
    return uri.removeprefix(SCHEME).rstrip("/")


@dataclass(frozen=True)
class S3Access:
    """How to reach the object storage: `endpoint` empty for AWS, else the server's URL
    (`http://host:port`, path-style addressing); keys empty for anonymous access."""

    endpoint: str = ""
    region: str = "us-east-1"
    access_key_id: str = field(default="", repr=False)
    secret_access_key: str = field(default="", repr=False)

    def filesystem(self):
        """pyarrow's S3 filesystem for these settings."""
        from pyarrow.fs import S3FileSystem

        endpoint = urlsplit(self.endpoint) if self.endpoint else None
        return S3FileSystem(
            access_key=self.access_key_id or None,
            secret_key=self.secret_access_key or None,
            region=self.region,
            endpoint_override=endpoint.netloc if endpoint else None,
            scheme=endpoint.scheme if endpoint else "https",
        )

    def duckdb_secret(self, conn: duckdb.DuckDBPyConnection, name: str = "pipeline_s3") -> None:
        """Load httpfs from its wheel and give `conn` a secret for every `s3://` path."""
        from duckdb_extensions import import_extension

        import_extension("httpfs", con=conn)  # from the wheel's file: nothing is downloaded
        conn.execute("LOAD httpfs")
        options, params = ["TYPE s3", "REGION ?"], [self.region]
        if self.access_key_id:
            options += ["KEY_ID ?", "SECRET ?"]
            params += [self.access_key_id, self.secret_access_key]
        if self.endpoint:
            endpoint = urlsplit(self.endpoint)
            options += ["ENDPOINT ?", "URL_STYLE 'path'", "USE_SSL ?"]
            params += [endpoint.netloc, endpoint.scheme == "https"]
        conn.execute(f"CREATE OR REPLACE SECRET {name} ({', '.join(options)})", params)
