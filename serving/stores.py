"""Where ``craft sync`` copies a model repository from: a bucket of S3-compatible object storage, or a folder.

Both answer the same three questions about keys relative to the repository's root (``manifest.json``,
``unet_base/1/model.onnx``): the bytes of one object, the objects under a folder with a version tag
each (a tag changes whenever the object is replaced), and a copy of one object into a local file.
The folder store is what the tests use in place of a bucket (no network), and what syncs a
repository from one mounted volume to a local disk. Each object also has a modification time
(the store's clock: S3's ``LastModified``, a file's mtime), which tells a sync whether objects
were uploaded after the manifest.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

__all__ = ["StoreError", "Entry", "Store", "FolderStore", "S3Store", "open_store", "safe_key"]


class StoreError(RuntimeError):
    """The store cannot be reached or read (credentials, network, a missing bucket)."""


@dataclass(frozen=True)
class Entry:
    """One object of a listing: a tag that changes whenever it is replaced, and when it was written."""

    tag: str
    modified: float  # seconds since the epoch, the store's clock


class Store(Protocol):
    def read(self, key: str) -> bytes | None:
        """The object's bytes, or None when there is no such object."""

    def modified(self, key: str) -> float | None:
        """When the object was written (None: no such object)."""

    def listing(self, folder: str) -> Mapping[str, Entry]:
        """Every object under ``folder/``: path relative to the folder -> its entry."""

    def download(self, key: str, dest: Path) -> None:
        """Copy the object into the local file ``dest`` (its folder exists)."""


def safe_key(relative: str) -> str:
    """A key below a folder that is a plain relative path (no ``..``, no absolute path, no empty part)."""
    parts = relative.split("/")
    if relative.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in relative:
        raise StoreError(f"object key {relative!r} is not a plain relative path; refusing to copy it")
    return relative


@dataclass(frozen=True)
class FolderStore:
    """A repository in a local (or mounted) folder; an object's tag is its size and modification time."""

    root: Path

    def __str__(self) -> str:
        return str(self.root)

    def read(self, key: str) -> bytes | None:
        try:
            return (self.root / key).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"{self.root / key}: {exc.strerror or exc}") from exc

    def modified(self, key: str) -> float | None:
        try:
            return (self.root / key).stat().st_mtime
        except FileNotFoundError:
            return None

    def listing(self, folder: str) -> Mapping[str, Entry]:
        base = self.root / folder
        out = {}
        for dirpath, _, files in os.walk(base):
            for name in files:
                path = Path(dirpath) / name
                st = path.stat()
                out[path.relative_to(base).as_posix()] = Entry(f"{st.st_size}-{st.st_mtime_ns}", st.st_mtime)
        return out

    def download(self, key: str, dest: Path) -> None:
        try:
            shutil.copyfile(self.root / key, dest)
        except OSError as exc:
            raise StoreError(f"{self.root / key}: {exc.strerror or exc}") from exc


class S3Store:
    """``s3://BUCKET/PREFIX`` through boto3 (the ``s3`` extra). Credentials, region and endpoint come
    from boto3's usual sources: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (/ ``AWS_SESSION_TOKEN``),
    ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL`` for a store other than AWS (MinIO, Ceph RGW, ...), or an
    IAM role of the pod. An object's tag is its ETag and size."""

    def __init__(self, url: str, endpoint_url: str | None = None):
        if not url.startswith("s3://") or not url[5:].split("/", 1)[0]:
            raise StoreError(f"--source: expected s3://BUCKET/PREFIX, got {url!r}")
        bucket, _, prefix = url[5:].partition("/")
        self.url, self.bucket, self.prefix = url, bucket, prefix.strip("/")
        try:
            import boto3
        except ImportError as exc:
            raise StoreError("s3:// sources need boto3: pip install 'craft-lora-serve[s3]'") from exc
        self._client = boto3.client("s3", endpoint_url=endpoint_url or None)
        from botocore.exceptions import BotoCoreError, ClientError

        self._errors = (BotoCoreError, ClientError)

    def __str__(self) -> str:
        return self.url

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _fail(self, what: str, exc: Exception) -> StoreError:
        return StoreError(f"{self.url}: {what}: {exc}")

    def _missing(self, exc: Exception) -> bool:
        return getattr(exc, "response", {}).get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound")

    def read(self, key: str) -> bytes | None:
        try:
            return self._client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except self._errors as exc:
            if self._missing(exc):
                return None
            raise self._fail(f"reading {key}", exc) from exc

    def modified(self, key: str) -> float | None:
        try:
            return self._client.head_object(Bucket=self.bucket, Key=self._key(key))["LastModified"].timestamp()
        except self._errors as exc:
            if self._missing(exc):
                return None
            raise self._fail(f"reading {key}", exc) from exc

    def listing(self, folder: str) -> Mapping[str, Entry]:
        base = self._key(folder.rstrip("/")) + "/"
        out = {}
        try:
            for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base):
                for obj in page.get("Contents", []):
                    if not obj["Key"].endswith("/"):  # "folder" placeholder objects some tools create
                        tag = f"{obj['ETag'].strip(chr(34))}-{obj['Size']}"
                        out[obj["Key"][len(base):]] = Entry(tag, obj["LastModified"].timestamp())
        except self._errors as exc:
            raise self._fail(f"listing {folder}/", exc) from exc
        return out

    def download(self, key: str, dest: Path) -> None:
        try:
            self._client.download_file(self.bucket, self._key(key), str(dest))
        except self._errors as exc:
            raise self._fail(f"downloading {key}", exc) from exc


def open_store(source: str, endpoint_url: str | None = None) -> Store:
    """``s3://BUCKET/PREFIX`` or a local folder."""
    if source.startswith("s3://"):
        return S3Store(source, endpoint_url)
    if "://" in source:
        raise StoreError(f"--source: only s3:// URLs and local folders are supported, got {source!r}")
    root = Path(source)
    if not root.is_dir():
        raise StoreError(f"--source: {root} is not a folder")
    return FolderStore(root)
