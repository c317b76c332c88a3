#!/usr/bin/env bash
# Lightning's own checkpointing and logger tests, without and then with trainctl's plugins.
#
# Takes tests/tests_pytorch from a source checkout of Lightning at the installed version (or the
# newest tag before it, with a warning), runs a named selection of it twice against the INSTALLED
# lightning package, once as is and once with CheckpointSync appended to every Trainer and
# MetricsReporter in the logger matrix (scripts/lightning_suite_plugin.py), and prints the totals
# of each run, the excluded tests with their reasons, the tests whose outcome changed, and a final
# JSON line. Not part of `make test`: CI cannot download Lightning's tests.
#
# Usage: scripts/lightning_suite.sh [options] [-- extra pytest args]
#   --source SRC   git repo path (bare or not) or URL of Lightning
#                  [$LIGHTNING_SUITE_SOURCE, else /work/.mirror/Lightning-AI+pytorch-lightning/repo
#                  if it exists, else https://github.com/Lightning-AI/pytorch-lightning]
#   --ref REF      tag or commit of the tests [$LIGHTNING_SUITE_REF, else the installed version's tag,
#                  else the newest release tag below it]
#   --python PY    the interpreter whose lightning (and torch) version is "installed"
#                  [$LIGHTNING_SUITE_PYTHON, else .venv/bin/python, else python3]. If it can import
#                  everything Lightning's tests need, the tests run in it (nothing is installed);
#                  else in a venv built once in --venv with the same lightning and torch versions.
#   --venv DIR     [$LIGHTNING_SUITE_VENV, else .lightning-suite/venv]: about 1.2 GB, 2-3 minutes
#                  to build on first use (torch from TRAINCTL_TORCH_SPEC, as scripts/setup.sh)
#   --quick        the two checkpoint-IO files, the logger matrix and the two versioning tests named
#                  in issue 12, instead of the whole selection
#   --workers N    pytest-xdist workers per run [2; 0 = one process]
#   --timeout S    per-test timeout in seconds [300]
#   --keep DIR     copy the two JUnit reports and pytest logs to DIR
# Exit code: 0 no test got worse with our plugins, 1 some did, 2 the harness itself failed.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
DEFAULT_MIRROR=/work/.mirror/Lightning-AI+pytorch-lightning/repo
SOURCE=${LIGHTNING_SUITE_SOURCE:-}
REF=${LIGHTNING_SUITE_REF:-}
PY=${LIGHTNING_SUITE_PYTHON:-}
VENV=${LIGHTNING_SUITE_VENV:-$REPO/.lightning-suite/venv}
QUICK=0
WORKERS=2
TIMEOUT=300
KEEP=
EXTRA=()

die() { echo "lightning_suite: $*" >&2; exit 2; }

while [ $# -gt 0 ]; do
    case $1 in
        --source) SOURCE=${2:?--source needs a value}; shift 2 ;;
        --ref) REF=${2:?--ref needs a value}; shift 2 ;;
        --python) PY=${2:?--python needs a value}; shift 2 ;;
        --venv) VENV=${2:?--venv needs a value}; shift 2 ;;
        --quick) QUICK=1; shift ;;
        --workers) WORKERS=${2:?--workers needs a value}; shift 2 ;;
        --timeout) TIMEOUT=${2:?--timeout needs a value}; shift 2 ;;
        --keep) KEEP=${2:?--keep needs a value}; shift 2 ;;
        --) shift; EXTRA=("$@"); break ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
done
[[ $WORKERS =~ ^[0-9]+$ ]] || die "--workers '$WORKERS': must be a whole number (0 = no xdist)"
[[ $TIMEOUT =~ ^[0-9]+$ && $TIMEOUT -gt 0 ]] || die "--timeout '$TIMEOUT': must be a positive number of seconds"
if [ -z "$SOURCE" ]; then
    if [ -d "$DEFAULT_MIRROR" ]; then SOURCE=$DEFAULT_MIRROR; else SOURCE=https://github.com/Lightning-AI/pytorch-lightning; fi
fi
if [ -z "$PY" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then PY=$REPO/.venv/bin/python; else PY=python3; fi
fi
command -v "$PY" >/dev/null || die "--python '$PY': no such interpreter"
# the runs cd into the extracted tests: make paths absolute (without resolving a venv's symlink)
case $PY in */*) PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY") ;; esac
mkdir -p "$(dirname "$VENV")" && VENV=$(cd "$(dirname "$VENV")" && pwd)/$(basename "$VENV")

# The selection (paths under tests/tests_pytorch); lightning_suite_plugin.py knows the same files.
SELECTION=(
    checkpointing/test_model_checkpoint.py
    checkpointing/test_trainer_checkpoint.py
    checkpointing/test_checkpoint_callback_frequency.py
    plugins/test_checkpoint_io_plugin.py
    loggers/test_all.py
)
if [ "$QUICK" = 1 ]; then
    SELECTION=(
        checkpointing/test_model_checkpoint.py::test_ckpt_version_after_rerun_same_trainer
        checkpointing/test_model_checkpoint.py::test_none_monitor_not_alternating
        checkpointing/test_trainer_checkpoint.py
        plugins/test_checkpoint_io_plugin.py
        loggers/test_all.py
    )
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/lightning-suite.XXXXXX")
PGID=
cleanup() {
    if [ -n "$PGID" ] && kill -0 -- "-$PGID" 2>/dev/null; then
        kill -TERM -- "-$PGID" 2>/dev/null || true
        sleep 2
        kill -KILL -- "-$PGID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- the installed versions -----------------------------------------------------------------
read -r INSTALLED TORCH_VERSION < <("$PY" -c 'import lightning, torch; print(lightning.__version__, torch.__version__)') \
    || die "$PY cannot import lightning and torch: give --python the interpreter of your project's venv"
echo "==> installed: lightning $INSTALLED, torch $TORCH_VERSION ($PY)"

# --- the environment the tests run in -------------------------------------------------------
# What Lightning's conftest and the selected files import (pytest-rerunfailures: the `flaky`
# marker; jsonargparse: test_model_checkpoint.py; tensorboard: TensorBoardLogger in the matrix).
NEEDED="pytest pytest_timeout xdist pytest_rerunfailures jsonargparse tensorboard cloudpickle yaml"
has_all() { "$1" -c "import importlib, sys; [importlib.import_module(m) for m in sys.argv[1:]]" $NEEDED 2>/dev/null; }
if has_all "$PY"; then
    RUNPY=$PY
    echo "==> running in $PY (it has everything the tests import; nothing installed)"
else
    RUNPY=$VENV/bin/python
    REQS=(
        "lightning==$INSTALLED"
        "pytest>=8" pytest-timeout pytest-xdist "pytest-rerunfailures>=14"
        "jsonargparse[signatures]>=4.39,<4.46" "tensorboard>=2.11,<2.21" "omegaconf>=2.2.3,<2.4" cloudpickle psutil
    )
    TORCH_SPEC=${TRAINCTL_TORCH_SPEC:-torch==${TORCH_VERSION%%+*}}
    # trainctl's own dependencies, read from pyproject.toml (trainctl itself comes from PYTHONPATH,
    # so nothing is installed from, or written into, this checkout)
    DEPS=$("$PY" - "$REPO/pyproject.toml" <<'EOF'
import sys
try:
    import tomllib
except ModuleNotFoundError:
    import tomli as tomllib
deps = tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]
print("\n".join(d for d in deps if not d.startswith(("torch", "lightning"))))
EOF
)
    want=$(printf '%s\n' "$TORCH_SPEC" "${REQS[@]}" "$DEPS" | sha256sum | cut -c1-16)
    if [ ! -f "$VENV/.stamp" ] || [ "$(cat "$VENV/.stamp")" != "$want" ]; then
        echo "==> building $VENV (once: about 2-3 minutes and 1.2 GB)"
        [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV" || die "cannot create a venv in $VENV"
        PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
        printf '%s\n' "$DEPS" > "$WORK/requirements.txt"
        { "$VENV/bin/python" -c "import torch" 2>/dev/null || "${PIP[@]}" install "$TORCH_SPEC"; } \
            && "${PIP[@]}" install -r "$WORK/requirements.txt" "${REQS[@]}" \
            || die "installing the test environment into $VENV failed (see pip's output above)"
        echo "$want" > "$VENV/.stamp"
    fi
    got=$("$RUNPY" -c 'import lightning; print(lightning.__version__)')
    [ "$got" = "$INSTALLED" ] || die "$VENV has lightning $got, not $INSTALLED: remove $VENV and run again"
    has_all "$RUNPY" || die "$VENV lacks one of: $NEEDED (remove $VENV and run again)"
    echo "==> running in $VENV (lightning $INSTALLED, torch ${TORCH_SPEC#torch==})"
fi

# --- Lightning's tests ----------------------------------------------------------------------
if [ -d "$SOURCE" ]; then
    GITDIR=$SOURCE
    TAGS=$(git -C "$GITDIR" tag -l) || die "--source '$SOURCE' is a folder but not a git repository of Lightning"
else
    TAGS=$(git ls-remote --tags --refs "$SOURCE" | sed 's#.*refs/tags/##') \
        || die "cannot list the tags of '$SOURCE': give --source a local git repository of Lightning or a reachable git URL"
fi
if [ -z "$REF" ]; then
    RELEASES=$(grep -E '^[0-9]+\.[0-9]+\.[0-9]+$' <<<"$TAGS" || true)
    if grep -qxF "$INSTALLED" <<<"$RELEASES"; then
        REF=$INSTALLED
    else
        REF=$(printf '%s\n' "$RELEASES" "$INSTALLED" | sort -V | grep -B1 -xF "$INSTALLED" | head -n1)
        [ -n "$REF" ] && [ "$REF" != "$INSTALLED" ] || die "no release tag at or below $INSTALLED in $SOURCE: give --ref"
        echo "warning: $SOURCE has no tag $INSTALLED (the installed lightning); using $REF, the newest tag below it." \
            "A test that differs between them fails in both runs alike, so it shows no change."
    fi
fi
if [ ! -d "$SOURCE" ]; then
    GITDIR=$WORK/lightning.git
    echo "==> fetching $REF from $SOURCE"
    git clone -q --bare --depth 1 --branch "$REF" "$SOURCE" "$GITDIR" || die "cannot fetch ref '$REF' from $SOURCE"
fi
COMMIT=$(git -C "$GITDIR" rev-parse -q --verify "$REF^{commit}") || die "ref '$REF' is not in $SOURCE"
mkdir "$WORK/src"
# pyproject.toml: Lightning's pytest settings (filterwarnings, xfail_strict, markers)
git -C "$GITDIR" archive "$COMMIT" pyproject.toml tests/tests_pytorch 2>"$WORK/archive.err" | tar -x -C "$WORK/src" \
    || { cat "$WORK/archive.err" >&2; die "cannot extract tests/tests_pytorch at $REF from $SOURCE"; }
echo "==> Lightning's tests at $REF (${COMMIT:0:12}), in $WORK/src"

# --- the two runs ---------------------------------------------------------------------------
XDIST=()
[ "$WORKERS" -gt 0 ] && XDIST=(-n "$WORKERS")
run() {  # run <label> <attach 0|1>
    local label=$1 start rc=0 left
    start=$(date +%s)
    echo "==> run $label our plugins (${#SELECTION[@]} selections, ${WORKERS} workers)"
    # In its own process group, so that cleanup can end it with everything it started.
    (
        cd "$WORK/src/tests/tests_pytorch"
        exec env LIGHTNING_SUITE_ATTACH="$2" LIGHTNING_SUITE_DESELECTED="$WORK/deselected-$label.json" \
            PYTHONPATH="$REPO:$REPO/scripts" PYTHONDONTWRITEBYTECODE=1 TRAINCTL_HOME="$WORK/trainctl-home" \
            setsid "$RUNPY" -m pytest -p no:cacheprovider -p lightning_suite_plugin -q --color=no \
            "${XDIST[@]}" --timeout "$TIMEOUT" --basetemp "$WORK/tmp-$label" --junitxml "$WORK/$label.xml" \
            "${SELECTION[@]}" "${EXTRA[@]}"
    ) >"$WORK/$label.log" 2>&1 &
    PGID=$!
    wait "$PGID" || rc=$?
    # pytest-xdist's workers may still be exiting when pytest returns: give them a few seconds
    for _ in $(seq 20); do pgrep -g "$PGID" >/dev/null || break; sleep 0.5; done
    left=$(ps -o pid=,args= -g "$PGID" || true)
    if [ -n "$left" ]; then
        echo "warning: the $label run left processes behind; ending them:"
        echo "$left" | cut -c1-160 | sed 's/^/    /'
        kill -KILL -- "-$PGID" 2>/dev/null || true
    fi
    PGID=
    echo "    $(grep -E '(passed|failed|error|skipped|no tests ran)' "$WORK/$label.log" | tail -n1) [$(($(date +%s) - start)) s]"
    if [ "$rc" -gt 1 ] || [ ! -s "$WORK/$label.xml" ]; then
        tail -n 40 "$WORK/$label.log" >&2
        die "the $label run ended with pytest exit code $rc, before reporting its tests"
    fi
}
run without 0
run with 1

if [ -n "$KEEP" ]; then
    mkdir -p "$KEEP"
    cp "$WORK"/without.xml "$WORK"/with.xml "$WORK"/without.log "$WORK"/with.log "$KEEP"/
    echo "==> reports and logs copied to $KEEP"
fi
rc=0
"$RUNPY" "$REPO/scripts/lightning_suite_compare.py" "$WORK/without.xml" "$WORK/with.xml" \
    --ref "$REF" --installed "$INSTALLED" --tests-root "$WORK/src/tests" --deselected "$WORK/deselected-without.json" || rc=$?
exit "$rc"
