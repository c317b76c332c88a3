"""Code sync: the user's project directory, uploaded content-addressed so an instance can rebuild it.

Design:

* **Content addressing.** Every file's bytes are stored once, under their SHA-256, in a prefix
  shared by all runs of a store (``<store>/_code/blobs/<sha256>``). A launch lists that prefix once
  and uploads only the blobs that are not there yet, so launching again with nothing changed
  uploads no file contents, and changing one file uploads exactly that file. A blob's name is its
  checksum, so it can never be "updated": whoever reads it can verify it, and a blob is never
  deleted or replaced by a later launch.
* **One manifest per run.** What makes a tree is its manifest (``<run>/code.json``): relative
  path -> sha256, size, mode, as canonical JSON, so equal trees give equal bytes. It is written
  create-only into the run, and its SHA-256 goes into ``job.json`` (:class:`CodeRef`): the agent
  refuses a manifest that does not match, and a run keeps the exact code it was launched with
  even when later launches share (and add to) the blob prefix.
* **What is uploaded.** A walk of the project that honours ``.gitignore`` files (the root's and
  nested ones, with git's semantics: a nested file's patterns are relative to its folder, deeper
  files and later lines win) and then a root ``.trainctlignore`` (same syntax; its ``!pattern``
  re-includes what git ignores). Some things are never uploaded: ``.git/``, caches, virtualenvs,
  ``node_modules/``. Files that look like secrets (``.env``, keys, ``.aws/`` ...) are skipped and
  named unless ``.trainctlignore`` re-includes them by name. A project that is still too big
  after that (a dataset or a venv in the tree) is refused before anything is uploaded, with a
  message naming the big folders.
* **Fetching.** The agent downloads the manifest, checks it against the job's :class:`CodeRef`,
  then every blob it lacks, verifies each against its checksum and writes it atomically with its
  mode. A local blob cache keeps content that was already downloaded once.

Example::

    bundle = scan_project(".")
    code, stats = upload_bundle(bundle, "s3://bucket/runs", "s3://bucket/runs/exp1")
    # ... on the instance:
    fetch_bundle(code, "/work/code")
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import logging
import os
import re
import stat
import threading
import time
import uuid
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import fsspec
import pathspec
from fsspec.callbacks import Callback

from trainctl_lightning.checkpoint.resume import default_cache_dir
from trainctl_lightning.errors import ConfigError, ConflictError, IntegrityError, TrainctlError
from trainctl_lightning.jobs.spec import CodeRef
from trainctl_lightning.jobs.store import CODE_MANIFEST_NAME, JobStore, blobs_url_in
from trainctl_lightning.retry import RetryPolicy
from trainctl_lightning.store import RunStore, explain_store_error, sha256_file

log = logging.getLogger(__name__)

CODE_FORMAT = "trainctl.code/1"
TRAINCTL_IGNORE = ".trainctlignore"
#: Folders never uploaded, whatever the ignore files say (VCS data, caches, tool state).
ALWAYS_SKIP_DIRS = frozenset(
    {".git", "__pycache__", ".ipynb_checkpoints", ".trainctl-staging", "node_modules", ".mypy_cache", ".pytest_cache"}
)
#: A folder holding one of these is a Python environment (virtualenv / conda), never uploaded.
_ENV_MARKERS = ("pyvenv.cfg", "conda-meta")
#: Files that usually hold credentials; skipped unless ``.trainctlignore`` re-includes them with ``!``.
SECRET_PATTERNS = (
    ".env",
    ".env.*",
    "*.pem",
    "*.key",
    "id_rsa*",
    "id_ed25519*",
    ".aws/",
    ".netrc",
    "credentials.json",
    ".pypirc",
)
_MB = 1_000_000  # sizes and limits are decimal megabytes, as printed
_CHUNK = 1 << 20
# Blobs up to this size are read into memory once, checked and put in one request: what is
# stored is exactly what was hashed. Larger ones are streamed and the local file re-hashed after.
_IN_MEMORY_MAX = 8 << 20
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_EXEC = 0o755
_PLAIN = 0o644


# --------------------------------------------------------------------------- bundle


@dataclass(frozen=True)
class BundleFile:
    """One file of a code bundle."""

    path: str
    """Relative POSIX path below the project root (never absolute, never with ``..``)."""
    size: int
    sha256: str
    """Hex SHA-256 of the content; also the blob's name in the store."""
    mode: int
    """``0o755`` when the local file is executable by anyone, else ``0o644``."""


@dataclass
class CodeBundle:
    """A scanned project: which files to upload, with their checksums."""

    root: Path
    """The project directory (absolute)."""
    files: list[BundleFile]
    """Sorted by path."""
    skipped_secrets: list[str] = field(default_factory=list)
    """Paths left out because they look like credentials (folders end with ``/``)."""

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def manifest_bytes(self) -> bytes:
        """The manifest as canonical JSON: equal trees give equal bytes (and the same SHA-256)."""
        files = {f.path: {"sha256": f.sha256, "size": f.size, "mode": f.mode} for f in self.files}
        return json.dumps({"format": CODE_FORMAT, "files": files}, sort_keys=True, separators=(",", ":")).encode()

    def manifest_sha256(self) -> str:
        return hashlib.sha256(self.manifest_bytes()).hexdigest()


def scan_project(
    root: str | os.PathLike[str],
    *,
    max_total_mb: float = 100.0,
    max_file_mb: float = 50.0,
    include: Sequence[str] = (),
) -> CodeBundle:
    """Find the files of a project to upload and hash them.

    Sizes are checked before anything is hashed, so refusing a project with a dataset in it
    costs one walk of the tree.

    Args:
        root: the project directory.
        max_total_mb: refuse a project whose files add up to more than this (decimal MB).
        max_file_mb: refuse a project with one file larger than this.
        include: extra gitignore-style patterns to upload even though an ignore file excludes
            them (``--include``); they do not override the built-in skips or the secret rules.

    Raises:
        ConfigError: ``root`` is not a directory, or the project is over a size limit (the
            message names the biggest folders and files and says how to include them on purpose).

    Example::

        bundle = scan_project("~/proj", include=["data/labels.csv"])
        print(len(bundle.files), bundle.total_bytes, bundle.skipped_secrets)
    """
    if not max_total_mb > 0:
        raise ConfigError(f"max_total_mb must be > 0, got {max_total_mb!r}")
    if not max_file_mb > 0:
        raise ConfigError(f"max_file_mb must be > 0, got {max_file_mb!r}")
    if isinstance(include, str):
        raise ConfigError(f"include must be a list of patterns, got the string {include!r}")
    project = Path(root).expanduser().absolute()
    if not project.is_dir():
        what = "does not exist" if not project.exists() else "is not a directory"
        raise ConfigError(f"project directory {project} {what}: pass the folder that holds your training script")
    rules = _Rules.load(project, include)
    candidates, secrets = _walk(project, rules)
    _check_sizes(project, candidates, max_total_mb, max_file_mb)
    files = []
    for rel, local, _, mode in candidates:
        try:
            digest, size = sha256_file(local)
        except OSError as exc:
            raise ConfigError(f"cannot read {local} to upload it: {exc}; fix its permissions or ignore it") from None
        files.append(BundleFile(path=rel, size=size, sha256=digest, mode=mode))
    files.sort(key=lambda f: f.path)
    if secrets:
        log.warning(
            "not uploading %d file(s) that look like secrets: %s (add '!NAME' to %s to upload one on purpose)",
            len(secrets),
            ", ".join(secrets),
            TRAINCTL_IGNORE,
        )
    return CodeBundle(root=project, files=files, skipped_secrets=secrets)


class _Rules:
    """The ignore rules of one project: built-in skips, .gitignore layers, .trainctlignore, includes."""

    def __init__(self, trainctl: pathspec.GitIgnoreSpec | None, reincludes: list[str], include: list[str]) -> None:
        self.trainctl = trainctl
        self.include = pathspec.GitIgnoreSpec.from_lines(include) if include else None
        self.secrets = pathspec.GitIgnoreSpec.from_lines(SECRET_PATTERNS)
        # Patterns that may re-include something inside an ignored folder: only anchored ones
        # (with a folder part) make the walk look inside, as in git, so an ignored 2 GB dataset
        # is not walked because of a '!*.txt' somewhere.
        self._reinclude_parts = [p.split("/") for p in (_anchored(x) for x in reincludes + include) if p]

    @classmethod
    def load(cls, root: Path, include: Sequence[str]) -> "_Rules":
        lines = _read_lines(root / TRAINCTL_IGNORE)
        reincludes = [ln.strip()[1:] for ln in lines if ln.strip().startswith("!")]
        try:
            spec = pathspec.GitIgnoreSpec.from_lines(lines) if lines else None
            return cls(spec, reincludes, [str(p) for p in include])
        except (ValueError, TypeError) as exc:  # pathspec rejects malformed patterns
            raise ConfigError(f"bad pattern in {root / TRAINCTL_IGNORE} or --include: {exc}") from None

    def ignored(self, rel: str, layers: Sequence[tuple[str, pathspec.GitIgnoreSpec]]) -> bool:
        """Whether ``rel`` (folders with a trailing ``/``) is excluded: the last matching rule wins."""
        result = False
        for base, spec in layers:
            hit = spec.check_file(rel[len(base) + 1 :] if base else rel).include
            if hit is not None:
                result = hit
        if self.trainctl is not None:
            hit = self.trainctl.check_file(rel).include
            if hit is not None:
                result = hit
        if result and self.include is not None and self.include.match_file(rel):
            result = False
        return result

    def secret(self, rel: str) -> bool:
        """Looks like a credential and ``.trainctlignore`` does not re-include it by name.

        A blanket ``!*`` does not count: a secret is uploaded only when a ``!`` line names it.
        """
        if not self.secrets.match_file(rel):
            return False
        if self.trainctl is None or self.trainctl.check_file(rel).include is not False:
            return True
        return not any(
            p.include is False and not _blanket(str(p.pattern)) and p.match_file(rel) for p in self.trainctl.patterns
        )

    def may_reinclude_below(self, rel_dir: str) -> bool:
        """Whether some anchored re-include pattern could match a path inside ``rel_dir``."""
        parts = rel_dir.split("/")
        for pat in self._reinclude_parts:  # every pat has a folder part, so len(pat) >= 2
            for i, name in enumerate(parts):
                if pat[i] == "**":
                    return True
                if i == len(pat) - 1 or not fnmatch.fnmatchcase(name, pat[i]):
                    break  # the pattern names this folder itself or another one: nothing below
            else:
                return True
        return False


def _blanket(pattern: str) -> bool:
    """``!*``, ``!/**``, ``!**/*``...: matches everything, so it names nothing in particular."""
    core = pattern.strip().lstrip("!").strip("/")
    while core.startswith("**/"):
        core = core[3:]
    return core in ("", "*", "**")


def _anchored(pattern: str) -> str:
    """The pattern as a root-relative path when it names a folder part, else ''."""
    p = pattern.strip()
    if p.startswith("!"):
        p = p[1:]
    if not p or p.startswith("#"):
        return ""
    p = p.rstrip("/")
    if "/" not in p:
        return ""
    return p.lstrip("/")


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8", errors="replace").splitlines()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return []
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None


def _is_env_dir(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, marker)) for marker in _ENV_MARKERS)


# (relative path, local path, size, mode)
_Candidate = tuple[str, str, int, int]


def _walk(root: Path, rules: _Rules) -> tuple[list[_Candidate], list[str]]:
    """Every file to upload (not yet hashed) and the secrets left out."""
    real_root = os.path.realpath(root)
    found: list[_Candidate] = []
    secrets: list[str] = []
    dir_links: list[str] = []
    stack: list[tuple[str, str, tuple[tuple[str, pathspec.GitIgnoreSpec], ...]]] = [("", str(root), ())]
    while stack:
        rel_dir, abs_dir, layers = stack.pop()
        lines = _read_lines(Path(abs_dir) / ".gitignore")
        if lines:
            try:
                layers = layers + ((rel_dir, pathspec.GitIgnoreSpec.from_lines(lines)),)
            except (ValueError, TypeError) as exc:
                log.warning("ignoring %s/.gitignore: %s", abs_dir, exc)
        try:
            with os.scandir(abs_dir) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            log.warning("not uploading %s: cannot list it (%s)", abs_dir, exc)
            continue
        for entry in entries:
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            if entry.name in ALWAYS_SKIP_DIRS:
                continue  # also a '.git' file (a submodule's or worktree's pointer)
            try:
                is_link = entry.is_symlink()
                is_dir = entry.is_dir(follow_symlinks=False)
                if is_link and os.path.isdir(entry.path):
                    if not rules.ignored(rel + "/", layers):
                        dir_links.append(rel)
                    continue
            except OSError:
                continue
            if is_dir:
                if rules.ignored(rel + "/", layers) and not rules.may_reinclude_below(rel):
                    continue
                if rules.secret(rel + "/"):
                    secrets.append(rel + "/")
                    continue
                if _is_env_dir(entry.path):
                    log.debug("not uploading %s: it is a Python environment", rel)
                    continue
                stack.append((rel, entry.path, layers))
                continue
            if entry.name.endswith(".pyc") or rules.ignored(rel, layers):
                continue
            if rules.secret(rel):
                secrets.append(rel)
                continue
            if is_link:
                target = os.path.realpath(entry.path)
                if os.path.commonpath([real_root, target]) != real_root:
                    log.warning("not uploading %s: it is a symlink to %s, outside the project", rel, target)
                    continue
            try:
                st = entry.stat()  # follows a link to a file inside the project
            except OSError as exc:
                log.warning("not uploading %s: %s", rel, exc)
                continue
            if not stat.S_ISREG(st.st_mode):
                continue  # sockets, fifos, devices
            found.append((rel, entry.path, st.st_size, _EXEC if st.st_mode & 0o111 else _PLAIN))
    if dir_links:
        log.info("not following symlinks to folders (their content is not uploaded): %s", ", ".join(sorted(dir_links)))
    return found, sorted(secrets)


# --------------------------------------------------------------------------- size limits


def _check_sizes(root: Path, files: list[_Candidate], max_total_mb: float, max_file_mb: float) -> None:
    total = sum(size for _, _, size, _ in files)
    if total > max_total_mb * _MB:
        biggest = ", ".join(f"{name} {_human(size)}" for name, size in _biggest(files))
        raise ConfigError(
            f"project {root} is {_human(total)} to upload, over the {max_total_mb:g} MB limit: {biggest}; "
            f"add them to {TRAINCTL_IGNORE} (datasets belong in object storage), or raise the limit with "
            "code_max_mb / --code-max-mb to include them on purpose"
        )
    too_big = sorted(((size, rel) for rel, _, size, _ in files if size > max_file_mb * _MB), reverse=True)
    if too_big:
        names = ", ".join(f"{rel} {_human(size)}" for size, rel in too_big[:5]) + (" ..." if len(too_big) > 5 else "")
        raise ConfigError(
            f"project {root} has {len(too_big)} file(s) over the {max_file_mb:g} MB per-file limit: {names}; "
            f"add them to {TRAINCTL_IGNORE} (datasets and checkpoints belong in object storage), or raise the "
            "limit with code_max_mb / --code-max-mb (the per-file limit is half of it) to include them on purpose"
        )


def _biggest(files: list[_Candidate], limit: int = 4) -> list[tuple[str, int]]:
    """The top-level folders and files that hold most of the bytes, drilling into a folder while
    one subfolder holds nearly all of it (``src/data/`` rather than ``src/``)."""
    dir_size: dict[str, int] = {}
    children: dict[str, set[str]] = {}
    for rel, _, size, _ in files:
        parts = rel.split("/")
        parent = ""
        for i in range(len(parts) - 1):
            d = "/".join(parts[: i + 1])
            dir_size[d] = dir_size.get(d, 0) + size
            children.setdefault(parent, set()).add(d)
            parent = d
    top: dict[str, int] = {}
    for rel, _, size, _ in files:
        if "/" not in rel:
            top[rel] = size
    for d in children.get("", ()):
        top[d + "/"] = dir_size[d]
    total = sum(top.values())
    ranked = sorted(top.items(), key=lambda kv: (-kv[1], kv[0]))
    # name what matters: the biggest entry, and the others that hold at least 5% of the bytes
    ranked = ranked[:1] + [kv for kv in ranked[1:limit] if kv[1] >= 0.05 * total]
    picked = []
    for name, size in ranked:
        while name.endswith("/"):
            subs = children.get(name[:-1], set())
            best = max(subs, key=lambda d: dir_size[d], default=None)
            if best is None or dir_size[best] < 0.9 * size:
                break
            name, size = best + "/", dir_size[best]
        picked.append((name, size))
    return picked


def _human(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            v = n / scale
            return f"{v:.1f} {unit}" if v < 10 else f"{v:.0f} {unit}"
    return f"{int(n)} B"


# --------------------------------------------------------------------------- upload


@dataclass
class UploadStats:
    """What one :func:`upload_bundle` did."""

    files: int
    """Files in the bundle."""
    bytes_total: int
    """Bytes in the bundle."""
    files_uploaded: int
    """Blobs uploaded (distinct contents the store did not have yet)."""
    bytes_uploaded: int
    seconds: float

    def describe(self) -> str:
        unchanged = self.files - self.files_uploaded
        return (
            f"code: {self.files} files, {_human(self.bytes_total)}; uploaded {self.files_uploaded} "
            f"({_human(self.bytes_uploaded)}), {unchanged} unchanged, in {self.seconds:.2f}s"
        )


def upload_bundle(
    bundle: CodeBundle,
    store_url: str,
    run_url: str,
    *,
    storage_options: dict[str, Any] | None = None,
    workers: int = 8,
    progress: Callable[[int], None] | None = None,
) -> tuple[CodeRef, UploadStats]:
    """Upload the blobs the store lacks, then the run's manifest (create-only).

    Args:
        bundle: from :func:`scan_project`.
        store_url: the store root; blobs go to ``<store_url>/_code/blobs/<sha256>``.
        run_url: the run; the manifest goes to ``<run_url>/code.json``.
        storage_options: passed to fsspec (credentials, ``endpoint_url``).
        workers: blobs uploaded in parallel.
        progress: called with the number of bytes just uploaded, possibly from several
            threads (one at a time), for a progress bar.

    Returns:
        The :class:`CodeRef` for the job spec, and what was uploaded.

    Raises:
        StoreError: the store cannot be listed or written (one line saying what to do).
        IntegrityError: a local file changed after it was scanned; nothing refers to it.
        ConflictError: the run already has a different code manifest.
    """
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    started = time.monotonic()
    blobs = RunStore(blobs_url_in(store_url), storage_options)
    jobs = JobStore(run_url, storage_options)
    present = _list_blobs(blobs)
    todo: dict[str, BundleFile] = {}
    for f in bundle.files:
        if present.get(f.sha256) != f.size and f.sha256 not in todo:
            todo[f.sha256] = f
    report = _locked(progress)
    if todo:
        _run_all(
            ThreadPoolExecutor(max_workers=min(workers, len(todo)), thread_name_prefix="trainctl-code-up"),
            [lambda f=f: _put_blob(blobs, bundle.root, f, report) for f in todo.values()],
            blobs.url,
            "upload code to",
        )
    data = bundle.manifest_bytes()
    try:
        jobs.write_code_manifest(data)
    except ConflictError:
        # a retried launch of the same run with the same tree is fine; another tree is not
        if jobs.store.read_object(CODE_MANIFEST_NAME) != data:
            raise ConflictError(
                f"{jobs.store.url_of(CODE_MANIFEST_NAME)} already holds another code manifest; it was not "
                "overwritten (launch with a new run id)"
            ) from None
    ref = CodeRef(
        manifest_url=jobs.store.url_of(CODE_MANIFEST_NAME),
        manifest_sha256=hashlib.sha256(data).hexdigest(),
        blobs_url=blobs.url,
        files=len(bundle.files),
        bytes=bundle.total_bytes,
    )
    stats = UploadStats(
        files=len(bundle.files),
        bytes_total=bundle.total_bytes,
        files_uploaded=len(todo),
        bytes_uploaded=sum(f.size for f in todo.values()),
        seconds=time.monotonic() - started,
    )
    log.info(
        "code: %d files (%s), uploaded %d (%s) in %.1fs",
        stats.files,
        _human(stats.bytes_total),
        stats.files_uploaded,
        _human(stats.bytes_uploaded),
        stats.seconds,
    )
    return ref, stats


def _locked(progress: Callable[[int], None] | None) -> Callable[[int], None]:
    if progress is None:
        return lambda n: None
    lock = threading.Lock()

    def report(n: int) -> None:
        if n:
            with lock:
                progress(n)

    return report


class _Progress(Callback):
    def __init__(self, report: Callable[[int], None]) -> None:
        super().__init__()
        self._report = report

    def relative_update(self, inc: int = 1) -> None:
        self.value += inc
        self._report(inc)

    def absolute_update(self, value: int) -> None:
        self._report(max(0, value - self.value))
        self.value = value


def _list_blobs(blobs: RunStore) -> dict[str, int]:
    """sha256 -> size of the blobs in the store (one listing)."""

    def listing() -> list[dict[str, Any]]:
        blobs.forget_listings(blobs.root)
        try:
            return list(blobs.fs.ls(blobs.root, detail=True))
        except FileNotFoundError:
            return []

    try:
        entries = blobs.retry.call(listing, what=f"list {blobs.url}")
    except Exception as exc:
        raise explain_store_error(exc, blobs.url, "list code blobs in") from exc
    out = {}
    for e in entries:
        name = str(e.get("name", "")).rstrip("/").rsplit("/", 1)[-1]
        if e.get("type") == "file" and _SHA_RE.match(name):
            out[name] = int(e.get("size") or 0)
    return out


def _changed(local: Path, f: BundleFile) -> IntegrityError:
    return IntegrityError(
        f"{local} changed after it was scanned for upload; its new content was not stored. "
        "Launch again once it is no longer being written"
    )


def _put_blob(blobs: RunStore, root: Path, f: BundleFile, report: Callable[[int], None]) -> None:
    local = root / f.path
    remote = blobs.path(f.sha256)
    if blobs._is_local:
        # copy to a temporary name while hashing, then rename: a half-written or changed file
        # never appears under a checksum name (a later listing would take it as present)
        os.makedirs(blobs.root, exist_ok=True)
        tmp = f"{blobs.root}/.tmp-{uuid.uuid4().hex}"
        try:
            digest = hashlib.sha256()
            with open(local, "rb") as src, open(tmp, "wb") as dst:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    dst.write(chunk)
                    report(len(chunk))
            if digest.hexdigest() != f.sha256:
                raise _changed(local, f)
            os.replace(tmp, remote)
            tmp = ""
        finally:
            if tmp:
                os.unlink(tmp)
        return
    if f.size <= _IN_MEMORY_MAX:
        data = local.read_bytes()
        if hashlib.sha256(data).hexdigest() != f.sha256:
            raise _changed(local, f)
        blobs.retry.call(lambda: blobs.fs.pipe_file(remote, data), what=f"upload {blobs.url_of(f.sha256)}")
        report(len(data))
        return
    blobs.retry.call(
        lambda: blobs._upload_file(str(local), remote, _Progress(report)), what=f"upload {blobs.url_of(f.sha256)}"
    )
    if sha256_file(local)[0] != f.sha256:
        try:
            blobs.fs.rm_file(remote)
        except Exception as exc:  # the store may be failing too; the blob is referenced by nothing
            log.warning("could not remove %s after its source changed: %s", blobs.url_of(f.sha256), exc)
        raise _changed(local, f)


def _run_all(pool: ThreadPoolExecutor, tasks: Iterable[Callable[[], Any]], url: str, action: str) -> list[Any]:
    """Run tasks on ``pool``; on the first failure cancel what has not started and raise it."""
    with pool:
        futures: list[Future[Any]] = [pool.submit(t) for t in tasks]
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        failed = next((fut for fut in futures if fut.done() and fut.exception() is not None), None)
        if failed is not None:
            for fut in pending:
                fut.cancel()
            exc = failed.exception()
            assert exc is not None
            if isinstance(exc, TrainctlError):
                raise exc
            raise explain_store_error(exc, url, action) from exc
    return [fut.result() for fut in futures]


# --------------------------------------------------------------------------- fetch


@dataclass
class FetchStats:
    """What one :func:`fetch_bundle` did."""

    files: int
    """Files in the bundle (all of them are in ``dest`` afterwards)."""
    bytes_downloaded: int
    """Bytes read from the store."""
    bytes_reused: int
    """Bytes of files taken from the local blob cache or already in ``dest``."""
    seconds: float


def default_blob_cache() -> Path:
    """``$TRAINCTL_CACHE_DIR/blobs``, else ``~/.cache/trainctl/blobs``."""
    return default_cache_dir() / "blobs"


def fetch_bundle(
    code: CodeRef,
    dest: str | os.PathLike[str],
    *,
    storage_options: dict[str, Any] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    workers: int = 8,
) -> FetchStats:
    """Rebuild a code bundle under ``dest``, every file verified against its checksum.

    Files already in ``dest`` with the right content are kept (their mode is fixed); other
    files in ``dest`` are left alone. Each file is written under a temporary name and renamed
    once verified, so a failed fetch never leaves a corrupt file behind.

    Args:
        code: from the job spec.
        dest: folder to rebuild the project in (created if missing).
        storage_options: passed to fsspec.
        cache_dir: local blob cache (default :func:`default_blob_cache`).
        workers: blobs downloaded in parallel.

    Raises:
        IntegrityError: the manifest does not match ``code.manifest_sha256``, lists an unsafe
            path, or a blob is missing or fails its checksum (the message names the file).
        StoreError: the store cannot be read.
    """
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    started = time.monotonic()
    opts = dict(storage_options or {})
    retry = RetryPolicy()
    raw = _read_manifest(code.manifest_url, opts, retry)
    digest = hashlib.sha256(raw).hexdigest()
    if digest != code.manifest_sha256:
        raise IntegrityError(
            f"code manifest {code.manifest_url} has sha256 {digest[:12]}..., the job expects "
            f"{code.manifest_sha256[:12]}...: it was replaced or corrupted; refusing to run that code"
        )
    files = parse_manifest(raw, code.manifest_url)
    dest_path = Path(dest).expanduser().absolute()
    try:
        dest_path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the code folder {dest_path}: {exc}") from None
    real_dest = os.path.realpath(dest_path)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_blob_cache()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"cannot use blob cache {cache}: {exc}; set TRAINCTL_CACHE_DIR to a writable folder"
        ) from None
    try:
        fs, blobs_root = fsspec.core.url_to_fs(code.blobs_url, **opts)
    except Exception as exc:
        raise explain_store_error(exc, code.blobs_url, "open") from exc
    blobs_root = blobs_root.rstrip("/")

    by_sha: dict[str, list[BundleFile]] = {}
    reused = 0
    checked: set[str] = set()
    for f in files:
        target = dest_path / f.path
        parent = os.path.dirname(f.path)
        if parent not in checked:
            # a symlink already in dest must not take a write outside it
            if os.path.commonpath([real_dest, os.path.realpath(target.parent)]) != real_dest:
                raise IntegrityError(
                    f"code file {f.path} of {code.manifest_url} would be written outside {dest_path} "
                    "(through a symlink there); refusing it"
                )
            checked.add(parent)
        if _has_content(target, f):
            if stat.S_IMODE(target.stat().st_mode) != f.mode:
                os.chmod(target, f.mode)
            reused += f.size
        else:
            by_sha.setdefault(f.sha256, []).append(f)

    def fetch_one(sha: str, wanted: list[BundleFile]) -> tuple[int, int]:
        cached = cache / sha[:2] / sha
        downloaded = 0
        if not cached.is_file():
            downloaded = _download_blob(fs, f"{blobs_root}/{sha}", cached, wanted, retry)
        try:
            for f in wanted:
                _materialise(cached, dest_path / f.path, f)
        except _CacheCorrupt:
            # a damaged cache entry: drop it, download again once
            cached.unlink(missing_ok=True)
            downloaded = _download_blob(fs, f"{blobs_root}/{sha}", cached, wanted, retry)
            for f in wanted:
                _materialise(cached, dest_path / f.path, f)
        size = wanted[0].size
        return downloaded, size * len(wanted) - downloaded

    results: list[tuple[int, int]] = []
    if by_sha:
        results = _run_all(
            ThreadPoolExecutor(max_workers=min(workers, len(by_sha)), thread_name_prefix="trainctl-code-down"),
            [lambda s=s, w=w: fetch_one(s, w) for s, w in by_sha.items()],
            code.blobs_url,
            "download code from",
        )
    stats = FetchStats(
        files=len(files),
        bytes_downloaded=sum(d for d, _ in results),
        bytes_reused=reused + sum(r for _, r in results),
        seconds=time.monotonic() - started,
    )
    log.info(
        "code: %d files in %s, downloaded %s, reused %s in %.1fs",
        stats.files,
        dest_path,
        _human(stats.bytes_downloaded),
        _human(stats.bytes_reused),
        stats.seconds,
    )
    return stats


def parse_manifest(raw: bytes, where: str = "code manifest") -> list[BundleFile]:
    """The files of a code manifest, every entry checked (safe path, checksum form, mode).

    Raises:
        IntegrityError: not a code manifest, or an entry is malformed or unsafe.
    """
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise IntegrityError(f"{where} is not valid JSON ({exc}); refusing it") from None
    if not isinstance(data, dict) or data.get("format") != CODE_FORMAT:
        fmt = data.get("format") if isinstance(data, dict) else None
        raise IntegrityError(
            f"{where} has format {fmt!r}, this trainctl reads {CODE_FORMAT!r}: upgrade trainctl on the instance"
        )
    entries = data.get("files")
    if not isinstance(entries, dict):
        raise IntegrityError(f"{where} has no 'files' table; refusing it")
    files = []
    for path, entry in entries.items():
        _check_rel_path(path, where)
        if not isinstance(entry, dict):
            raise IntegrityError(f"{where}: entry {path!r} is not an object; refusing it")
        sha, size, mode = entry.get("sha256"), entry.get("size"), entry.get("mode")
        if not isinstance(sha, str) or not _SHA_RE.match(sha):
            raise IntegrityError(f"{where}: entry {path!r} has sha256 {sha!r}, not 64 hex digits; refusing it")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise IntegrityError(f"{where}: entry {path!r} has size {size!r}; refusing it")
        if mode not in (_PLAIN, _EXEC) or isinstance(mode, bool):
            raise IntegrityError(f"{where}: entry {path!r} has mode {mode!r}, expected 0o644 or 0o755; refusing it")
        files.append(BundleFile(path=path, size=size, sha256=sha, mode=mode))
    files.sort(key=lambda f: f.path)
    names = {f.path for f in files}
    for f in files:
        parts = f.path.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in names:
                folder = "/".join(parts[:i])
                raise IntegrityError(f"{where} lists {folder!r} both as a file and as a folder; refusing it")
    return files


def _check_rel_path(path: Any, where: str) -> None:
    if (
        not isinstance(path, str)
        or not path
        or path.startswith("/")
        or "\x00" in path
        or "\\" in path
        or any(part in ("", ".", "..") for part in path.split("/"))
    ):
        raise IntegrityError(f"{where} lists the unsafe path {path!r} (absolute or leaving the project); refusing it")


def _read_manifest(url: str, opts: dict[str, Any], retry: RetryPolicy) -> bytes:
    try:
        fs, path = fsspec.core.url_to_fs(url, **opts)

        def read() -> bytes:
            fs.invalidate_cache(path)
            return fs.cat_file(path)

        return retry.call(read, what=f"read {url}")
    except FileNotFoundError:
        raise IntegrityError(
            f"code manifest {url} is missing from the store; the run's code cannot be rebuilt"
        ) from None
    except Exception as exc:
        raise explain_store_error(exc, url, "read the code manifest") from exc


def _has_content(target: Path, f: BundleFile) -> bool:
    try:
        st = os.lstat(target)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size == f.size and sha256_file(target)[0] == f.sha256


def _download_blob(fs: Any, remote: str, cached: Path, wanted: list[BundleFile], retry: RetryPolicy) -> int:
    """Download one blob into the cache, verified; returns its size."""
    names = ", ".join(f.path for f in wanted[:3]) + (" ..." if len(wanted) > 3 else "")
    url = fs.unstrip_protocol(remote)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(f".{cached.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        try:
            retry.call(lambda: fs.get_file(remote, str(tmp)), what=f"download {url}")
        except FileNotFoundError:
            raise IntegrityError(f"code file {names}: its blob {url} is missing from the store") from None
        except Exception as exc:
            raise explain_store_error(exc, url, "download") from exc
        digest, size = sha256_file(tmp)
        expected = wanted[0]
        if size != expected.size or digest != expected.sha256:
            raise IntegrityError(
                f"code file {names} fails its checksum: blob {url} is {size} bytes with sha256 {digest[:12]}..., "
                f"the manifest says {expected.size} bytes, {expected.sha256[:12]}...; the blob is corrupt, refusing it"
            )
        os.replace(tmp, cached)
        return size
    finally:
        tmp.unlink(missing_ok=True)


class _CacheCorrupt(Exception):
    """A cached blob does not match its name (internal: triggers one fresh download)."""


def _materialise(cached: Path, target: Path, f: BundleFile) -> None:
    """Copy a cached blob to ``target`` with ``f.mode``, verifying while copying, then rename."""
    if target.is_dir() and not target.is_symlink():
        raise ConfigError(f"cannot write code file {target}: a folder is in the way; fetch into an empty folder")
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        with open(cached, "rb") as src, open(tmp, "wb") as dst:
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
                dst.write(chunk)
        if digest.hexdigest() != f.sha256:
            raise _CacheCorrupt(str(cached))
        os.chmod(tmp, f.mode)
        os.replace(tmp, target)
    except OSError as exc:
        raise ConfigError(f"cannot write code file {target}: {exc}") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
