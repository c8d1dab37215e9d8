"""The landing folder: batch files arrive here, one file per batch; a local folder, or an
`s3://bucket/prefix` on object storage (any S3-compatible server), listed and streamed through
pyarrow's S3 filesystem, its credentials from the environment as secrets (dg.EnvVar)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
from pydantic import Field

from pipeline_project.core.object_storage import S3Access, is_uri, pyarrow_path
from pipeline_project.partitions import (
    BATCH_FILE_SUFFIXES,
    batch_id_for_file_name,
    is_valid_batch_id,
)
from pipeline_project.settings import LandingSettings, ObjectStorageSettings


@dataclass(frozen=True)
class LandingFile:
    batch_id: str
    path: Path  # on the landing filesystem: a local path, or bucket/key on S3
    size: int
    mtime_ns: int

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def fingerprint(self) -> str:
        """Cheap change detector: a re-delivered file gets a new size or modification time."""
        return f"{self.size}-{self.mtime_ns}"


@dataclass(frozen=True)
class RejectedFile:
    name: str
    reason: str
    fingerprint: str


@dataclass(frozen=True)
class LandingScan:
    files: dict[str, LandingFile]
    rejected: list[RejectedFile]


class LandingZone(dg.ConfigurableResource):
    """The folder where batch files (`<batch_id>.jsonl` or `<batch_id>.jsonl.gz`) land."""

    path: str = Field(description="Landing folder; PIPELINE_LANDING_DIR.")
    catalog_path: str = Field(description="Product catalog CSV; PIPELINE_CATALOG_PATH.")
    s3_prefix: str = Field(
        default="",
        description="s3://bucket/prefix the batch files land under instead of the folder;"
        " PIPELINE_LANDING_S3_PREFIX.",
    )
    s3_endpoint: str = Field(
        default="", description="S3-compatible server (empty: AWS); PIPELINE_S3_ENDPOINT."
    )
    s3_region: str = Field(default="us-east-1", description="PIPELINE_S3_REGION.")
    s3_access_key_id: str = Field(default="", repr=False, description="A secret (dg.EnvVar).")
    s3_secret_access_key: str = Field(default="", repr=False, description="A secret.")

    @classmethod
    def from_settings(
        cls, settings: LandingSettings, storage: ObjectStorageSettings | None = None
    ) -> LandingZone:
        storage = storage or ObjectStorageSettings()
        s3 = bool(settings.s3_prefix) or is_uri(settings.catalog_path)
        return cls(
            path=str(settings.landing_dir),
            catalog_path=str(settings.catalog_path),
            s3_prefix=settings.s3_prefix,
            s3_endpoint=storage.endpoint,
            s3_region=storage.region,
            # Secrets: Dagster reads them when the resource starts; never shown in the UI.
            s3_access_key_id=dg.EnvVar("PIPELINE_S3_ACCESS_KEY_ID") if s3 else "",
            s3_secret_access_key=dg.EnvVar("PIPELINE_S3_SECRET_ACCESS_KEY") if s3 else "",
        )

    @property
    def where(self) -> str:
        """Where batch files land, for messages."""
        return self.s3_prefix or self.path

    @property
    def s3_access(self) -> S3Access:
        return S3Access(
            self.s3_endpoint, self.s3_region, self.s3_access_key_id, self.s3_secret_access_key
        )

    def filesystem(self):
        """The pyarrow filesystem of the landing files: None for the local folder."""
        return self.s3_access.filesystem() if self.s3_prefix else None

    def _s3_root(self) -> str:
        """bucket/prefix of the S3 prefix, as pyarrow names it."""
        return pyarrow_path(self.s3_prefix)

    def _entries(self, names: list[str] | None = None) -> list[tuple[str, Path, int, int, str]]:
        """(name, path, size, mtime_ns, kind) of each entry of the landing place, or of the
        ones of `names` that exist (a stat each, no listing); kind is "file", "link" (a
        symbolic link: never read) or "other" (a folder)."""
        fs = self.filesystem()
        if fs is None:
            root = Path(self.path)
            if names is not None:
                paths = [root / name for name in names if (root / name).is_symlink()
                         or (root / name).exists()]  # fmt: skip
            elif root.is_dir():
                with os.scandir(root) as entries:
                    paths = [Path(entry.path) for entry in entries]
            else:
                paths = []
            return [_local_entry(path) for path in paths]
        from pyarrow.fs import FileSelector, FileType

        root = self._s3_root()
        infos = fs.get_file_info(
            FileSelector(root, allow_not_found=True) if names is None
            else [f"{root}/{name}" for name in names]
        )  # fmt: skip
        return [
            (Path(i.path).name, Path(i.path), i.size or 0, i.mtime_ns or 0,
             "file" if i.type == FileType.File else "other")
            for i in infos if i.type != FileType.NotFound
        ]  # fmt: skip

    def catalog_fingerprint(self) -> str | None:
        """Size and modification time of the catalog file, or None when it is missing."""
        if is_uri(self.catalog_path):
            from pyarrow.fs import FileType

            info = self.s3_access.filesystem().get_file_info(pyarrow_path(self.catalog_path))
            if info.type != FileType.File:
                return None
            return f"{info.size}-{info.mtime_ns}"
        try:
            stat = Path(self.catalog_path).stat()
        except FileNotFoundError:
            return None
        return f"{stat.st_size}-{stat.st_mtime_ns}"

    @contextmanager
    def local_catalog(self) -> Iterator[Path]:
        """The catalog file as a local path: the file itself, or a private copy of the object
        (removed afterwards) when the catalog is on object storage."""
        if not is_uri(self.catalog_path):
            yield Path(self.catalog_path)
            return
        from pyarrow.fs import copy_files

        with tempfile.TemporaryDirectory(prefix="pipeline-catalog.") as folder:
            local = Path(folder) / Path(pyarrow_path(self.catalog_path)).name
            copy_files(pyarrow_path(self.catalog_path), str(local),
                       source_filesystem=self.s3_access.filesystem())  # fmt: skip
            yield local

    def scan(self) -> LandingScan:
        """List batch files with a stat each; file contents are never read here."""
        candidates: dict[str, list[LandingFile]] = {}
        rejected: list[RejectedFile] = []
        for name, path, size, mtime_ns, kind in self._entries():
            # Dot-files are uploads in progress by convention (write, then rename into place).
            if name.startswith("."):
                continue
            fingerprint = f"{size}-{mtime_ns}"
            if kind == "link":
                rejected.append(RejectedFile(name, _SYMLINK, fingerprint))
                continue
            if kind != "file":
                continue
            batch_id = batch_id_for_file_name(name)
            if batch_id is None:
                rejected.append(RejectedFile(name, _name_problem(name), fingerprint))
                continue
            candidates.setdefault(batch_id, []).append(LandingFile(batch_id, path, size, mtime_ns))
        files: dict[str, LandingFile] = {}
        for batch_id, found in sorted(candidates.items()):
            if len(found) == 1:
                files[batch_id] = found[0]
                continue
            for f in found:
                reason = f"batch {batch_id} arrived as {len(found)} files; keep exactly one"
                rejected.append(RejectedFile(f.path.name, reason, f.fingerprint))
        return LandingScan(files=files, rejected=sorted(rejected, key=lambda r: r.name))

    def batch_file(self, batch_id: str) -> LandingFile:
        """The one landing file of a batch; a clear error when it is missing or ambiguous."""
        if not is_valid_batch_id(batch_id):
            raise ValueError(f"invalid batch id {batch_id!r}")
        found = []
        names = [f"{batch_id}{suffix}" for suffix in BATCH_FILE_SUFFIXES]
        for _, path, size, mtime_ns, kind in self._entries(names):
            if kind == "link":
                raise ValueError(f"{path}: {_SYMLINK}")
            if kind == "file":
                found.append(LandingFile(batch_id, path, size, mtime_ns))
        if not found:
            raise FileNotFoundError(
                f"no landing file for batch {batch_id!r} in {self.where} "
                f"(expected {batch_id}.jsonl or {batch_id}.jsonl.gz)"
            )
        if len(found) > 1:
            names_found = ", ".join(sorted(f.name for f in found))
            raise FileExistsError(
                f"batch {batch_id!r} has more than one landing file: {names_found}"
            )
        return found[0]

    def batch_file_names(self, batch_id: str) -> list[str]:
        """The names of the batch's landing files that exist (none, one, or several)."""
        if not is_valid_batch_id(batch_id):
            raise ValueError(f"invalid batch id {batch_id!r}")
        names = [f"{batch_id}{suffix}" for suffix in BATCH_FILE_SUFFIXES]
        return sorted(name for name, *_ in self._entries(names))

    def delete_batch_files(self, batch_id: str) -> list[str]:
        """Delete the batch's landing files (every name it may have: `.jsonl`, `.jsonl.gz`);
        the names of those deleted. A symbolic link is removed, never what it points to."""
        if not is_valid_batch_id(batch_id):
            raise ValueError(f"invalid batch id {batch_id!r}")
        names = [f"{batch_id}{suffix}" for suffix in BATCH_FILE_SUFFIXES]
        fs = self.filesystem()
        deleted = []
        for name, path, *_ in self._entries(names):
            if fs is None:
                Path(path).unlink(missing_ok=True)
            else:
                fs.delete_file(str(path))
            deleted.append(name)
        return deleted


def _local_entry(path: Path) -> tuple[str, Path, int, int, str]:
    stat = path.lstat()
    kind = "link" if path.is_symlink() else "file" if path.is_file() else "other"
    return path.name, path, stat.st_size, stat.st_mtime_ns, kind


# A link could point anywhere on the machine: only regular files in the folder are read.
_SYMLINK = "a symbolic link: a batch file must be a regular file in the landing folder"


def _name_problem(name: str) -> str:
    if not name.endswith(BATCH_FILE_SUFFIXES):
        return "not a batch file: the name must end in .jsonl or .jsonl.gz"
    return "the batch ID (the name before .jsonl) must match [A-Za-z0-9_-]{1,64}"
