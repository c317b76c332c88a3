"""Code sync: the user's project directory, uploaded content-addressed so an instance can rebuild it.

Design:

* **Content addressing.** Every file's bytes are stored once, under their SHA-256, in a prefix
  shared by all runs of a store (``<store>/_code/blobs/<sha256>``). A launch lists that prefix once
  and uploads only the blobs that are not there yet, so launching again with nothing changed
  uploads no file contents, and changing one file uploads exactly that file. A blob's name is its
  checksum, so it can never be "updated": whoever reads it can verify it, and a blob is never
  deleted or replaced by a later launch.
* **One manifest per run.** What makes a tree is its manifest (``<run>/code.json``): relative
  path -> sha256, size, mode (the permission bits), as canonical JSON, so equal trees give equal bytes. It is written
  create-only into the run, and its SHA-256 goes into ``job.json`` (:class:`CodeRef`): the agent
  refuses a manifest that does not match, and a run keeps the exact code it was launched with
  even when later launches share (and add to) the blob prefix.
* **What is uploaded.** A walk of the project that honours ``.gitignore`` files (the root's and
  nested ones, with git's semantics: a nested file's patterns are relative to its folder, deeper
  files and later lines win) and then a root ``.trainctlignore`` (same syntax; its ``!pattern``
  re-includes what git ignores). Some things are never uploaded: ``.git/``, caches, virtualenvs,
  ``node_modules/``. Files that look like secrets (:data:`SECRET_PATTERNS`: ``.env``, keys,
  ``.ssh/``, ``.aws/``, ``credentials``, ``.netrc`` ...), symlinks to them and symlinks out of the
  project are skipped and named (names only) unless ``.trainctlignore`` re-includes them by name. A project that is still too big
  after that (a dataset or a venv in the tree) is refused before anything is uploaded, with a
  message naming the big folders.
* **Fetching.** The agent downloads the manifest, checks it against the job's :class:`CodeRef`,
  then every blob it lacks, verifies each against its checksum and writes it atomically with its
  mode. A local blob cache keeps content that was already downloaded once.

The steps are one module each: :mod:`.scan`, :mod:`.upload`, :mod:`.fetch`; :mod:`.bundle`
holds the manifest format they share.

Example::

    bundle = scan_project(".")
    code, stats = upload_bundle(bundle, "s3://bucket/runs", "s3://bucket/runs/exp1")
    # ... on the instance:
    fetch_bundle(code, "/work/code")
"""

from __future__ import annotations

from trainctl_lightning.jobs.codesync.bundle import (
    CODE_FORMAT,
    BundleFile,
    CodeBundle,
    parse_manifest,
)
from trainctl_lightning.jobs.codesync.fetch import (
    FetchStats,
    default_blob_cache,
    fetch_bundle,
)
from trainctl_lightning.jobs.codesync.scan import (
    ALWAYS_SKIP_DIRS,
    SECRET_PATTERNS,
    TRAINCTL_IGNORE,
    describe_skipped,
    scan_project,
)
from trainctl_lightning.jobs.codesync.upload import UploadStats, upload_bundle

__all__ = [
    "ALWAYS_SKIP_DIRS",
    "CODE_FORMAT",
    "SECRET_PATTERNS",
    "TRAINCTL_IGNORE",
    "BundleFile",
    "CodeBundle",
    "FetchStats",
    "UploadStats",
    "default_blob_cache",
    "describe_skipped",
    "fetch_bundle",
    "parse_manifest",
    "scan_project",
    "upload_bundle",
]
