"""The landing folder: batch files arrive here, one file per batch."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
from pydantic import Field

from pipeline_project.partitions import (
    BATCH_FILE_SUFFIXES,
    batch_id_for_file_name,
    is_valid_batch_id,
)
from pipeline_project.settings import LandingSettings


@dataclass(frozen=True)
class LandingFile:
    batch_id: str
    path: Path
    size: int
    mtime_ns: int

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

    @classmethod
    def from_settings(cls, settings: LandingSettings) -> LandingZone:
        return cls(path=str(settings.landing_dir), catalog_path=str(settings.catalog_path))

    def catalog_fingerprint(self) -> str | None:
        """Size and modification time of the catalog file, or None when it is missing."""
        try:
            stat = Path(self.catalog_path).stat()
        except FileNotFoundError:
            return None
        return f"{stat.st_size}-{stat.st_mtime_ns}"

    def scan(self) -> LandingScan:
        """List batch files with a stat each; file contents are never read here."""
        root = Path(self.path)
        if not root.is_dir():
            return LandingScan(files={}, rejected=[])
        candidates: dict[str, list[LandingFile]] = {}
        rejected: list[RejectedFile] = []
        with os.scandir(root) as entries:
            for entry in entries:
                # Dot-files are uploads in progress by convention (write, then rename into place).
                if entry.name.startswith("."):
                    continue
                stat = entry.stat(follow_symlinks=False)
                fingerprint = f"{stat.st_size}-{stat.st_mtime_ns}"
                if entry.is_symlink():
                    rejected.append(RejectedFile(entry.name, _SYMLINK, fingerprint))
                    continue
                if not entry.is_file(follow_symlinks=False):
                    continue
                batch_id = batch_id_for_file_name(entry.name)
                if batch_id is None:
                    rejected.append(
                        RejectedFile(entry.name, _name_problem(entry.name), fingerprint)
                    )
                    continue
                candidates.setdefault(batch_id, []).append(
                    LandingFile(batch_id, Path(entry.path), stat.st_size, stat.st_mtime_ns)
                )
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
        for suffix in BATCH_FILE_SUFFIXES:
            path = Path(self.path) / f"{batch_id}{suffix}"
            if path.is_symlink():
                raise ValueError(f"{path}: {_SYMLINK}")
            if path.is_file():
                stat = path.stat()
                found.append(LandingFile(batch_id, path, stat.st_size, stat.st_mtime_ns))
        if not found:
            raise FileNotFoundError(
                f"no landing file for batch {batch_id!r} in {self.path} "
                f"(expected {batch_id}.jsonl or {batch_id}.jsonl.gz)"
            )
        if len(found) > 1:
            names = ", ".join(f.path.name for f in found)
            raise FileExistsError(f"batch {batch_id!r} has more than one landing file: {names}")
        return found[0]


# A link could point anywhere on the machine: only regular files in the folder are read.
_SYMLINK = "a symbolic link: a batch file must be a regular file in the landing folder"


def _name_problem(name: str) -> str:
    if not name.endswith(BATCH_FILE_SUFFIXES):
        return "not a batch file: the name must end in .jsonl or .jsonl.gz"
    return "the batch ID (the name before .jsonl) must match [A-Za-z0-9_-]{1,64}"
