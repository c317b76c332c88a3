"""Scanning a project: which files to upload (ignore rules, secrets, size limits), hashed."""

from __future__ import annotations

import fnmatch
import logging
import os
import stat
from collections.abc import Sequence
from pathlib import Path

import pathspec

from trainctl_lightning.errors import ConfigError
from trainctl_lightning.humanize import human_size
from trainctl_lightning.jobs.codesync.bundle import BundleFile, CodeBundle
from trainctl_lightning.store import sha256_file

__all__ = ["ALWAYS_SKIP_DIRS", "SECRET_PATTERNS", "TRAINCTL_IGNORE", "describe_skipped", "scan_project"]

log = logging.getLogger(__name__)

TRAINCTL_IGNORE = ".trainctlignore"
#: Folders never uploaded, whatever the ignore files say (VCS data, caches, tool state).
ALWAYS_SKIP_DIRS = frozenset(
    {".git", "__pycache__", ".ipynb_checkpoints", ".trainctl-staging", "node_modules", ".mypy_cache", ".pytest_cache"}
)
#: A folder holding one of these is a Python environment (virtualenv / conda), never uploaded.
_ENV_MARKERS = ("pyvenv.cfg", "conda-meta")
#: Files and folders that usually hold credentials: never uploaded, in one place.
#:
#: gitignore syntax, matched against the path below the project root (a pattern without a
#: ``/`` matches at any depth; ``**/`` makes a path pattern match at any depth). A symlink is
#: skipped when its own name or the file it resolves to matches, or when it resolves outside
#: the project. Skipped paths are named (names only) in the launch's output and in
#: :attr:`CodeBundle.skipped_secrets`. To upload one on purpose, name it in a ``!`` line of
#: ``.trainctlignore`` (``!config/dev.env``); ``--include`` and a blanket ``!*`` do not.
SECRET_PATTERNS = (
    # environment files: dotenv, direnv
    ".env",
    ".env.*",
    ".envrc",
    # private keys and certificate bundles
    "*.pem",
    "*.key",
    "*.p12",
    "*.pfx",
    "id_rsa*",
    "id_dsa*",
    "id_ecdsa*",
    "id_ed25519*",
    # SSH (keys, config, known_hosts, authorized_keys), AWS, GnuPG: whole folders
    ".ssh/",
    ".aws/",
    ".gnupg/",
    "authorized_keys",
    "known_hosts",
    # credential and token files of common tools
    "credentials",  # AWS shared credentials file
    "credentials.json",
    "application_default_credentials.json",  # gcloud
    ".git-credentials",
    ".netrc",
    "_netrc",
    ".pgpass",
    ".npmrc",
    ".pypirc",
    "**/.docker/config.json",
    "kaggle.json",
)
_MB = 1_000_000  # sizes and limits are decimal megabytes, as printed


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
            them (``--include``); they do not override the built-in skips or the secret rules
            (:data:`SECRET_PATTERNS`: only a ``!NAME`` line of ``.trainctlignore`` does).

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
        log.warning("%s", describe_skipped(secrets))
    return CodeBundle(root=project, files=files, skipped_secrets=secrets)


def describe_skipped(secrets: Sequence[str]) -> str:
    """One line naming the files left out as secrets (names only, never content)."""
    return (
        f"not uploading {len(secrets)} file(s) that may hold secrets (credential files, or symlinks to them "
        f"or out of the project): {', '.join(secrets)} (a '!NAME' line in {TRAINCTL_IGNORE} uploads one on purpose)"
    )


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
    def load(cls, root: Path, include: Sequence[str]) -> _Rules:
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
        return not any(p.include is False and not _blanket(str(p.pattern)) and p.match_file(rel) for p in self.trainctl.patterns)

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
                    # possibly ~/.aws/credentials: named, and counted with the secrets
                    log.debug("not uploading %s: it is a symlink to a file outside the project", rel)
                    secrets.append(rel)
                    continue
                if rules.secret(os.path.relpath(target, real_root).replace(os.sep, "/")):
                    secrets.append(rel)  # a link to .env is .env
                    continue
            try:
                st = entry.stat()  # follows a link to a file inside the project
            except OSError as exc:
                log.warning("not uploading %s: %s", rel, exc)
                continue
            if not stat.S_ISREG(st.st_mode):
                continue  # sockets, fifos, devices
            found.append((rel, entry.path, st.st_size, stat.S_IMODE(st.st_mode) & 0o777))
    if dir_links:
        log.info("not following symlinks to folders (their content is not uploaded): %s", ", ".join(sorted(dir_links)))
    return found, sorted(secrets)


# --------------------------------------------------------------------------- size limits


def _check_sizes(root: Path, files: list[_Candidate], max_total_mb: float, max_file_mb: float) -> None:
    total = sum(size for _, _, size, _ in files)
    if total > max_total_mb * _MB:
        biggest = ", ".join(f"{name} {human_size(size)}" for name, size in _biggest(files))
        raise ConfigError(
            f"project {root} is {human_size(total)} to upload, over the {max_total_mb:g} MB limit: {biggest}; "
            f"add them to {TRAINCTL_IGNORE} (datasets belong in object storage), or raise the limit with "
            "code_max_mb / --code-max-mb to include them on purpose"
        )
    too_big = sorted(((size, rel) for rel, _, size, _ in files if size > max_file_mb * _MB), reverse=True)
    if too_big:
        names = ", ".join(f"{rel} {human_size(size)}" for size, rel in too_big[:5]) + (" ..." if len(too_big) > 5 else "")
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
