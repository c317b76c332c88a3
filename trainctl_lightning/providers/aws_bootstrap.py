"""EC2 user data: the boot script that runs one job's agent, then powers the instance off.

The instance is created with ``InstanceInitiatedShutdownBehavior=terminate``, so powering off
terminates it. The script schedules a hard power-off at the max runtime *first*, and an ``EXIT``
trap powers off however the script ends (agent done, install failed, script error): an instance
cannot outlive its job by more than a shutdown.

cloud-init runs the script once, as root, with an almost empty environment; so the values below
marked "overridable" take their defaults there, while a test can run the same script on this
machine with::

    TRAINCTL_BOOTSTRAP_DRY=1            # apt-get, the uv installer and shutdown are logged, not run
                                        # (the agent's own power-off, TRAINCTL_SHUTDOWN_CMD, too)
    TRAINCTL_PYTHON=/path/to/python     # an interpreter that has trainctl-lightning: skip the install
    TRAINCTL_WORKDIR=/tmp/x  TRAINCTL_BOOTSTRAP_LOG=/tmp/x/boot.log
    SHUTDOWN_CMD=...  APT_GET=...  UV_INSTALL_URL=...

An ``s3://`` wheel is installed only if its SHA-256 is the one the launcher recorded in the
script (``INSTALL_SHA256``); otherwise the boot fails and the instance powers off.

The agent command itself always runs for real. User data is readable by anyone who can describe
the instance: nothing secret goes in it (the instance reads the store with its instance profile).

Internal: not part of the public API; it may change without notice.
"""

from __future__ import annotations

import hashlib
import math
import re
import shlex

from trainctl_lightning import __version__
from trainctl_lightning.errors import ConfigError
from trainctl_lightning.limits import MAX_RUNTIME_LIMIT_S, check_limit

__all__ = ["DEFAULT_WORKDIR", "USER_DATA_LIMIT", "default_install", "render_user_data", "summarize_user_data"]

#: EC2 refuses user data over 16 KB (before base64).
USER_DATA_LIMIT = 16 * 1024
DEFAULT_WORKDIR = "/opt/trainctl"
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_PLAIN_PATH = re.compile(r"^/[A-Za-z0-9._/-]+$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def default_install() -> str:
    """The pip requirement the instance installs when the launcher gives none: this very version."""
    return f"trainctl-lightning=={__version__}"


_TEMPLATE = r"""#!/bin/bash
# trainctl-lightning bootstrap: run the agent for one run, then power off (= terminate).
set -uo pipefail
export HOME="${HOME:-/root}" DEBIAN_FRONTEND=noninteractive

RUN_URL=__RUN_URL__
INSTALL=__INSTALL__  # pip requirement, or s3:// URL of a wheel (its file name kept)
INSTALL_SHA256=__INSTALL_SHA256__  # an s3:// wheel is installed only with this SHA-256 (the launcher's)
MAX_RUNTIME_MIN=__MAX_RUNTIME_MIN__
__EXPORTS__
# overridable (see trainctl_lightning/providers/aws_bootstrap.py)
DRY="${TRAINCTL_BOOTSTRAP_DRY:-0}"
WORKDIR="${TRAINCTL_WORKDIR:-__WORKDIR__}"
LOG="${TRAINCTL_BOOTSTRAP_LOG:-/var/log/trainctl-bootstrap.log}"
SHUTDOWN_CMD="${SHUTDOWN_CMD:-shutdown}"
APT_GET="${APT_GET:-apt-get}"
UV_INSTALL_URL="${UV_INSTALL_URL:-https://astral.sh/uv/install.sh}"

mkdir -p "$WORKDIR" "$(dirname "$LOG")"
# to the log and to the console (`aws ec2 get-console-output` shows a failed boot)
exec > >(tee -a "$LOG") 2>&1

log() { echo "[trainctl-bootstrap $(date -u +%Y-%m-%dT%H:%M:%SZ)] $*"; }
# every system action goes through here, so that a dry run can log it instead
sys_run() { if [ "$DRY" = 1 ]; then log "dry run: $*"; else "$@"; fi; }

power_off() {
  local rc=$?
  log "bootstrap exiting with status $rc: powering off"
  sys_run $SHUTDOWN_CMD -h now "trainctl: job ended"
}
trap power_off EXIT
# how the agent powers off once its job is done (AWSProvider.release_from_agent)
if [ "$DRY" = 1 ]; then
  export TRAINCTL_SHUTDOWN_CMD="${TRAINCTL_SHUTDOWN_CMD:-echo dry run: agent release: shutdown -h now}"
else
  export TRAINCTL_SHUTDOWN_CMD="${TRAINCTL_SHUTDOWN_CMD:-$SHUTDOWN_CMD -h now}"
fi

if [ -n "$MAX_RUNTIME_MIN" ]; then
  log "hard max runtime: power off in $MAX_RUNTIME_MIN minutes"
  sys_run $SHUTDOWN_CMD -h "+$MAX_RUNTIME_MIN" "trainctl: max runtime reached"
fi

VENV="$WORKDIR/venv"
PIP=()
make_venv() {
  export PATH="$HOME/.local/bin:$HOME/.cargo/bin:$PATH"
  if ! command -v uv >/dev/null; then
    log "installing uv"
    sys_run sh -c "curl -LsSf '$UV_INSTALL_URL' | sh"
  fi
  if command -v uv >/dev/null && uv venv --seed "$VENV"; then
    PIP=(uv pip install --python "$VENV/bin/python")
    return 0
  fi
  log "uv unavailable: falling back to venv + pip"
  sys_run $APT_GET update -q
  sys_run $APT_GET install -y -q python3-venv python3-pip
  python3 -m venv "$VENV" && PIP=("$VENV/bin/python" -m pip install -q)
}

fetch_s3() {  # URL DEST, with the instance profile's credentials
  if command -v aws >/dev/null; then aws s3 cp --only-show-errors "$1" "$2"; return; fi
  "${PIP[@]}" boto3 && "$VENV/bin/python" -c '
import sys, boto3
bucket, _, key = sys.argv[1][len("s3://"):].partition("/")
boto3.client("s3").download_file(bucket, key, sys.argv[2])' "$1" "$2"
}

install_trainctl() {
  make_venv || return 1
  local spec="$INSTALL"
  if [[ "$spec" == s3://* ]]; then
    mkdir -p "$WORKDIR/wheels"
    spec="$WORKDIR/wheels/${INSTALL##*/}"
    log "fetching $INSTALL"
    fetch_s3 "$INSTALL" "$spec" || return 1
    # anyone who can write the store could swap the wheel that runs as root here: check it
    local got
    got="$(sha256sum "$spec" | cut -d' ' -f1)"
    if [ -z "$INSTALL_SHA256" ] || [ "$got" != "$INSTALL_SHA256" ]; then
      log "REFUSED $INSTALL: its sha256 is $got, the launcher recorded ${INSTALL_SHA256:-none}; the wheel in the store was changed, nothing was installed"
      rm -f "$spec"
      return 1
    fi
    log "sha256 of $spec matches the launcher's ($got)"
  fi
  log "installing $spec"
  "${PIP[@]}" "$spec"
}

if [ -n "${TRAINCTL_PYTHON:-}" ]; then
  PY="$TRAINCTL_PYTHON"
  log "using $PY (TRAINCTL_PYTHON): nothing installed"
else
  install_trainctl || { log "could not install $INSTALL"; exit 90; }
  PY="$VENV/bin/python"
fi

cd "$WORKDIR" || exit 91
log "starting the agent for $RUN_URL"
"$PY" -m trainctl_lightning.agent run --run-url "$RUN_URL" --workdir "$WORKDIR"
rc=$?
log "agent exited with status $rc"
exit $rc
"""


def render_user_data(
    run_url: str,
    *,
    install: str | None = None,
    install_sha256: str | None = None,
    max_runtime_s: float | None = None,
    env: dict[str, str] | None = None,
    region: str | None = None,
    workdir: str = DEFAULT_WORKDIR,
) -> str:
    """The user-data script that runs the agent for ``run_url`` on a fresh instance.

    Args:
        run_url: ``s3://`` URL of the run (its ``job.json`` is what the agent runs).
        install: what to ``pip install`` for trainctl-lightning: a requirement
            (default: this version from PyPI) or the ``s3://`` URL of a wheel in the store,
            whose file name must be the wheel's own (pip reads the version from it).
        install_sha256: the SHA-256 of that wheel as the launcher built it; required with an
            ``s3://`` wheel: the script refuses (and powers off) when the fetched wheel differs.
        max_runtime_s: power the instance off this long after boot, whatever happens.
        env: variables exported for the agent (and its job); never secrets.
        region: exported as ``AWS_DEFAULT_REGION`` (boto3 and s3fs on the instance need it).
        workdir: where the agent keeps the code and environments.

    Raises:
        ConfigError: a bad URL or variable name, an ``s3://`` wheel without a valid
            ``install_sha256``, or a script over EC2's 16 KB limit.
    """
    if not run_url.startswith("s3://"):
        raise ConfigError(f"an EC2 instance reads its run from S3: run_url must be s3://..., got {run_url!r}")
    if not _PLAIN_PATH.match(workdir):
        raise ConfigError(f"workdir must be an absolute path of letters, digits, '.', '_', '-' and '/', got {workdir!r}")
    install = install or default_install()
    if install.startswith("s3://"):
        if not isinstance(install_sha256, str) or not _SHA256.match(install_sha256):
            raise ConfigError(
                f"install={install!r} is a wheel in the store, which the instance installs as root: give its "
                f"install_sha256 (64 hex digits, `sha256sum` of the wheel you uploaded), got {install_sha256!r}"
            )
    elif install_sha256 is not None:
        raise ConfigError(f"install_sha256 checks an s3:// wheel, but install={install!r} is a pip requirement")
    exports = {}
    if region:
        exports["AWS_DEFAULT_REGION"] = region
    for name, value in (env or {}).items():
        if not _ENV_NAME.match(name):
            raise ConfigError(f"env name {name!r} is not a valid shell variable name")
        exports[name] = value
    if max_runtime_s is not None:
        check_limit("max_runtime_s", max_runtime_s, maximum=MAX_RUNTIME_LIMIT_S)
    minutes = "" if max_runtime_s is None else str(max(1, math.ceil(max_runtime_s / 60)))
    script = (
        _TEMPLATE.replace("__RUN_URL__", shlex.quote(run_url))
        .replace("__INSTALL_SHA256__", shlex.quote(install_sha256 or ""))
        .replace("__INSTALL__", shlex.quote(install))
        .replace("__MAX_RUNTIME_MIN__", shlex.quote(minutes))
        .replace("__WORKDIR__", workdir)
        .replace("__EXPORTS__", "\n".join(f"export {k}={shlex.quote(v)}" for k, v in exports.items()))
    )
    size = len(script.encode())
    if size >= USER_DATA_LIMIT:
        raise ConfigError(
            f"the instance's boot script is {size} bytes, over EC2's {USER_DATA_LIMIT}-byte user-data limit: "
            "pass fewer or shorter env values (put large settings in the job instead)"
        )
    return script


def summarize_user_data(script: str) -> dict[str, object]:
    """What a dry run shows of the user data: its size and digest, not its text."""
    data = script.encode()
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "limit": USER_DATA_LIMIT}
