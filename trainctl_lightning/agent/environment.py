"""The job's Python environment: run the setup commands, then reuse an interpreter or build one.

``EnvMode.AUTO`` (the default) reuses the interpreter when it already satisfies the project's
requirements, so a job on the local provider starts in the launcher's own environment with
nothing installed; only when something is missing is an isolated environment built. Isolated
environments see the base interpreter's packages (torch, lightning, trainctl_lightning are
never reinstalled) and are cached by their requirements under ``<workdir>/envs/``.

Requirements come from the code root: ``pyproject.toml``'s ``[project].dependencies``, else
``requirements.txt``, plus the script's PEP 723 inline metadata (``# /// script``).

Internal: not part of the public API; it may change without notice.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from trainctl_lightning.errors import SetupError, SetupStopped
from trainctl_lightning.jobs.spec import EnvMode, JobSpec

__all__ = [
    "ENVS_DIR",
    "LogFn",
    "PreparedEnv",
    "Requirements",
    "StopFn",
    "build_isolated",
    "collect_requirements",
    "missing_requirements",
    "prepare_environment",
    "run_logged",
    "script_metadata",
]

log = logging.getLogger(__name__)

#: Receives everything setup prints; it goes into the job's log.
LogFn = Callable[[bytes], None]
StopFn = Callable[[], bool]

ENVS_DIR = "envs"
_READY = ".trainctl-env.json"
_PIP_QUIET = {"PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
# PEP 723's reference regular expression for inline script metadata blocks.
_PEP723 = re.compile(r"(?m)^# /// (?P<type>[a-zA-Z0-9-]+)$\s(?P<content>(^#(| .*)$\s)+)^# ///$")

# Run by the candidate interpreter: which requirements (JSON list on stdin) are not satisfied.
# packaging is not always installed, but pip vendors it.
_CHECK = r"""
import json, sys
from importlib import metadata
try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
missing = []
for line in json.load(sys.stdin):
    try:
        req = Requirement(line)
    except Exception:
        missing.append((line, "cannot be parsed"))
        continue
    if req.marker is not None and not req.marker.evaluate():
        continue
    try:
        version = metadata.version(req.name)
    except metadata.PackageNotFoundError:
        missing.append((line, "not installed"))
        continue
    if req.specifier and not req.specifier.contains(version, prereleases=True):
        missing.append((line, f"found {version}"))
json.dump(missing, sys.stdout)
"""

# Written into an isolated environment so that it also sees the packages of the interpreter it
# was built from even when that one is itself a virtual environment (--system-site-packages
# only reaches the base installation). addsitedir also runs their .pth files (editable installs).
_INHERIT = r"""
import json, site, sys
paths = [p for p in site.getsitepackages() if p]
if site.ENABLE_USER_SITE:
    paths.append(site.getusersitepackages())
json.dump(paths, sys.stdout)
"""


@dataclass(frozen=True)
class Requirements:
    """What the project says it needs."""

    items: list[str] = field(default_factory=list)
    """PEP 508 requirement strings (from pyproject.toml, requirements.txt and PEP 723)."""
    files: list[Path] = field(default_factory=list)
    """requirements.txt files, handed to pip as ``-r`` (they may hold pip options)."""
    unchecked: list[str] = field(default_factory=list)
    """Lines that cannot be checked without installing (``-e .``, URLs, local paths)."""
    options: list[str] = field(default_factory=list)
    """Index options from requirements files (``--index-url ...``), kept for the installer."""
    sources: list[str] = field(default_factory=list)
    """Where the requirements were found, for messages."""

    def __bool__(self) -> bool:
        return bool(self.items or self.unchecked)

    def __len__(self) -> int:
        return len(self.items) + len(self.unchecked)

    def pip_args(self) -> list[str]:
        """pip sees the base's packages through --system-site-packages and installs only what is missing."""
        args: list[str] = []
        for path in self.files:
            args += ["-r", str(path)]
        from_files = {i for p in self.files for i in _requirement_lines(p)[0]}
        return args + [i for i in self.items if i not in from_files]

    def uv_lines(self, unsatisfied: list[str]) -> list[str]:
        """A requirements file for uv: only what the base lacks.

        uv does not look at system site-packages (astral-sh/uv#4466): handed everything, it
        would install a second torch into the environment. Dependencies of what is missing may
        still be installed again; pip does not have that problem.
        """
        return self.options + self.unchecked + unsatisfied

    def digest(self, python: str) -> str:
        payload = {
            "python": os.path.abspath(python),  # not realpath: a venv's python links to its base
            "items": sorted(self.items),
            "unchecked": sorted(self.unchecked),
            "files": [p.read_text(errors="replace") for p in self.files],
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class PreparedEnv:
    """The interpreter the job runs with, and what the agent did to get it."""

    python: str
    description: str
    """One line for people, e.g. ``reused /usr/bin/python3 (all 4 requirements satisfied)``."""
    mode: str = "reused"
    """``reused``, ``isolated (uv)`` or ``isolated (venv)`` (recorded in the job state)."""


# ---------------------------------------------------------------- requirements


def script_metadata(text: str) -> dict | None:
    """The PEP 723 ``script`` metadata block of a script's source, parsed, or None.

    Raises:
        SetupError: more than one ``script`` block, or its TOML is invalid.

    Example::

        >>> script_metadata('# /// script\\n# dependencies = ["rich"]\\n# ///\\n')
        {'dependencies': ['rich']}
    """
    blocks = [m for m in _PEP723.finditer(text) if m.group("type") == "script"]
    if not blocks:
        return None
    if len(blocks) > 1:
        raise SetupError("the script has more than one '# /// script' metadata block (PEP 723 allows one)")
    content = "".join(
        line[2:] if line.startswith("# ") else line[1:] for line in blocks[0].group("content").splitlines(keepends=True)
    )
    try:
        return _toml_loads(content)
    except ValueError as exc:
        raise SetupError(f"the script's '# /// script' metadata is not valid TOML: {exc}") from None


def collect_requirements(code_root: Path, script: str | None = None) -> Requirements:
    """The requirements the project in ``code_root`` declares (see the module docstring).

    Raises:
        SetupError: a requirements file cannot be parsed.
    """
    items: list[str] = []
    files: list[Path] = []
    unchecked: list[str] = []
    options: list[str] = []
    sources: list[str] = []
    pyproject = code_root / "pyproject.toml"
    deps = None
    if pyproject.is_file():
        try:
            deps = _toml_loads(pyproject.read_text()).get("project", {}).get("dependencies")
        except ValueError as exc:
            raise SetupError(f"pyproject.toml is not valid TOML: {exc}") from None
    if deps is not None:
        items += [str(d) for d in deps]
        sources.append("pyproject.toml")
    elif (code_root / "requirements.txt").is_file():
        req_file = code_root / "requirements.txt"
        found, opaque, found_options = _requirement_lines(req_file)
        items += found
        unchecked += opaque
        options += found_options
        files.append(req_file)
        sources.append("requirements.txt")
    if script and (code_root / script).is_file():
        meta = script_metadata((code_root / script).read_text(errors="replace"))
        if meta and meta.get("dependencies"):
            items += [str(d) for d in meta["dependencies"]]
            sources.append(f"{script} (PEP 723)")
    return Requirements(items=items, files=files, unchecked=unchecked, options=options, sources=sources)


def missing_requirements(python: str, reqs: Requirements) -> list[str]:
    """The requirements ``python`` does not satisfy (markers honoured), each with the reason,
    checked in a subprocess of it.

    Lines that cannot be checked without installing are always reported as missing.
    """
    missing = [f"{line} (cannot be checked without installing)" for line in reqs.unchecked]
    return missing + [f"{line} ({why})" for line, why in _unsatisfied(python, reqs.items).items()]


def _unsatisfied(python: str, items: list[str]) -> dict[str, str]:
    if not items:
        return {}
    proc = subprocess.run([python, "-c", _CHECK], input=json.dumps(items), capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        reason = _last_line(proc.stderr) or f"exit code {proc.returncode}"
        return {line: f"could not check: {reason}" for line in items}
    return dict(json.loads(proc.stdout))


# ---------------------------------------------------------------- preparing


def prepare_environment(
    spec: JobSpec, code_root: Path, workdir: Path, log_output: LogFn, stop: StopFn | None = None
) -> PreparedEnv:
    """Run ``spec.setup`` in ``code_root``, then choose or build the interpreter per ``spec.env_mode``.

    Args:
        spec: the job.
        code_root: where the job's code is (requirements are read from here).
        workdir: the agent's working directory; isolated environments are cached in ``workdir/envs``.
        log_output: receives the output of setup commands and installers (the job's log).
        stop: polled while commands run; when it returns True they are stopped.

    Raises:
        SetupError: a setup command failed, the interpreter is missing, or an install failed
            (the message ends with the installer's last error line).
        SetupStopped: ``stop`` asked to stop while a command ran.
    """
    stop = stop or (lambda: False)
    env = {**os.environ, **spec.env}
    for command in spec.setup:
        log_output(f"$ {command}\n".encode())
        code, last = run_logged(command, cwd=code_root, env=env, log_output=log_output, stop=stop, shell=True)
        if code != 0:
            raise SetupError(f"setup command {command!r} failed with exit code {code}" + (f": {last}" if last else ""))

    base = spec.python or sys.executable
    if shutil.which(base) is None:
        raise SetupError(f"python interpreter {base!r} not found on this instance; set the job's python to one that exists")
    if spec.env_mode is EnvMode.REUSE:
        return PreparedEnv(base, f"reused {base} (env mode reuse: nothing checked or installed)")

    reqs = collect_requirements(code_root, spec.script)
    if spec.env_mode is EnvMode.AUTO:
        if not reqs:
            return PreparedEnv(base, f"reused {base} (the project declares no requirements)")
        missing = missing_requirements(base, reqs)
        total = len(reqs)
        if not missing:
            return PreparedEnv(base, f"reused {base} (all {total} requirements satisfied)")
        why = f"{len(missing)} of {total} requirements missing: {', '.join(missing[:3])}" + (", ..." if len(missing) > 3 else "")
        log_output(f"[trainctl agent] {base} does not satisfy the project: {why}; building an isolated environment\n".encode())
    else:
        why = "env mode isolated"
    return build_isolated(base, reqs, code_root, workdir / ENVS_DIR, env, log_output, stop, why=why)


def build_isolated(
    base: str,
    reqs: Requirements,
    code_root: Path,
    envs_dir: Path,
    env: dict[str, str],
    log_output: LogFn,
    stop: StopFn,
    why: str = "",
) -> PreparedEnv:
    """A virtual environment on top of ``base`` with ``reqs`` installed, cached by their digest.

    Built with ``uv`` when it is on PATH, else ``python -m venv`` and pip (taken from the base
    when it has one, so no ensurepip). A half-built environment (a crash mid-install) is never
    reused: it is marked ready only at the end.
    """
    envs_dir.mkdir(parents=True, exist_ok=True)
    target = envs_dir / reqs.digest(base)
    python = str(target / "bin" / "python")
    uv = shutil.which("uv", path=env.get("PATH"))
    tool = "uv" if uv else "venv"
    suffix = f" ({why})" if why else ""
    with open(envs_dir / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two agents building the same environment: one builds
        if (target / _READY).is_file():
            built_by = json.loads((target / _READY).read_text()).get("tool", tool)
            return PreparedEnv(python, f"isolated ({built_by}) at {target}, cached{suffix}", f"isolated ({built_by})")
        shutil.rmtree(target, ignore_errors=True)
        start = time.monotonic()
        env = {**env, **_PIP_QUIET}
        if uv:
            create = [uv, "venv", "--system-site-packages", "--python", base, str(target)]
        else:
            create = [base, "-m", "venv", "--system-site-packages", "--without-pip", str(target)]
        _run_step(create, code_root, env, log_output, stop, "creating the environment")
        _inherit_site_packages(base, python)
        if uv:
            lines = reqs.uv_lines(list(_unsatisfied(base, reqs.items)))
            install = None
            if lines:
                req_file = target / "trainctl-requirements.txt"
                req_file.write_text("\n".join(lines) + "\n")
                log_output(f"[trainctl agent] uv: installing {', '.join(lines)}\n".encode())
                install = [uv, "pip", "install", "--python", python, "-r", str(req_file)]
        else:
            args = reqs.pip_args()
            install = None
            if args:
                log_output(f"[trainctl agent] pip: installing {' '.join(args)}\n".encode())
                if subprocess.run([python, "-c", "import pip"], capture_output=True).returncode != 0:
                    _run_step([python, "-m", "ensurepip", "--default-pip"], code_root, env, log_output, stop, "installing pip")
                install = [python, "-m", "pip", "install", *args]
        if install:
            _run_step(install, code_root, env, log_output, stop, "installing the requirements")
        (target / _READY).write_text(
            json.dumps({"tool": tool, "base": base, "requirements": reqs.items, "seconds": time.monotonic() - start})
        )
    return PreparedEnv(python, f"isolated ({tool}) at {target}{suffix}", f"isolated ({tool})")


def _inherit_site_packages(base: str, python: str) -> None:
    paths = json.loads(subprocess.run([base, "-c", _INHERIT], capture_output=True, text=True, check=True).stdout)
    own = subprocess.run(
        [python, "-c", "import site, json, sys; json.dump(site.getsitepackages(), sys.stdout)"],
        capture_output=True,
        text=True,
        check=True,
    )
    site_dir = Path(json.loads(own.stdout)[0])
    site_dir.mkdir(parents=True, exist_ok=True)
    # the environment's own site-packages stays first: what it installs wins over the base
    lines = [f"import site; site.addsitedir({p!r})" for p in paths if os.path.isdir(p)]
    (site_dir / "_trainctl_base.pth").write_text("\n".join(lines) + "\n")


def _run_step(argv: list[str], cwd: Path, env: dict[str, str], log_output: LogFn, stop: StopFn, what: str) -> None:
    # in the code root: relative paths in requirements (``-e .``) are relative to the project
    code, last = run_logged(argv, cwd=cwd, env=env, log_output=log_output, stop=stop)
    if code != 0:
        raise SetupError(f"{what} failed ({Path(argv[0]).name} exit code {code})" + (f": {last}" if last else ""))


# ---------------------------------------------------------------- subprocesses


def run_logged(
    cmd: str | list[str],
    *,
    cwd: Path | None,
    env: dict[str, str],
    log_output: LogFn,
    stop: StopFn,
    shell: bool = False,
    grace_s: float = 5.0,
) -> tuple[int, str]:
    """Run ``cmd`` with its output going to ``log_output``; return its exit code and last error line.

    Raises:
        SetupStopped: ``stop()`` became true; the command's process group was stopped.
    """
    try:
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=env,
            shell=shell,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError as exc:
        return 127, f"{exc.strerror or exc}: {cmd if isinstance(cmd, str) else cmd[0]}"
    tail = bytearray()

    def read() -> None:
        assert proc.stdout is not None
        while chunk := os.read(proc.stdout.fileno(), 65536):
            log_output(chunk)
            tail.extend(chunk)
            del tail[:-8192]

    reader = threading.Thread(target=read, name="setup-output", daemon=True)
    reader.start()
    stopped = False
    while True:
        try:
            proc.wait(timeout=0.1)
            break
        except subprocess.TimeoutExpired:
            if not stopped and stop():
                stopped = True
                _signal_group(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=grace_s)
                except subprocess.TimeoutExpired:
                    _signal_group(proc.pid, signal.SIGKILL)
                break
    proc.wait()
    reader.join(timeout=2.0)
    if reader.is_alive():  # something in the group still holds the pipe open
        _signal_group(proc.pid, signal.SIGKILL)
        reader.join(timeout=2.0)
    if proc.stdout is not None:
        proc.stdout.close()
    if stopped:
        raise SetupStopped("setup was stopped")
    return proc.returncode, _error_line(tail.decode(errors="replace"))


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _error_line(text: str) -> str:
    """The installer's error line: the last one starting with 'error', else the last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.lower().startswith("error"):
            return line
    return lines[-1] if lines else ""


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _requirement_lines(path: Path, depth: int = 0) -> tuple[list[str], list[str], list[str]]:
    """(requirement strings, lines only an installer understands, index options) of a requirements file."""
    items: list[str] = []
    opaque: list[str] = []
    options: list[str] = []
    text = path.read_text(errors="replace").replace("\\\n", "")
    for raw in text.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", raw).strip()
        if not line:
            continue
        nested = re.match(r"^(-r|--requirement)[\s=]+(\S+)$", line)
        if nested and depth < 5:
            if not (path.parent / nested.group(2)).is_file():
                raise SetupError(f"{path.name} includes {nested.group(2)!r}, which is not in the code")
            sub = _requirement_lines(path.parent / nested.group(2), depth + 1)
            items += sub[0]
            opaque += sub[1]
            options += sub[2]
        elif re.match(r"^(-i|--index-url|--extra-index-url|--trusted-host|-f|--find-links|--pre)\b", line):
            options.append(line)
        elif line.startswith("-") or "://" in line or line.startswith((".", "/")):
            opaque.append(_absolute(line, path.parent))  # editable installs, URLs, paths: only installing tells
        else:
            items.append(line)
    return items, opaque, options


def _absolute(line: str, base: Path) -> str:
    """``-e .`` -> ``-e /code/root``: the line may end up in a file somewhere else (uv)."""
    match = re.match(r"^(-e\s+|--editable[\s=]+)?(\.\S*)$", line)
    if match is None:
        return line
    return f"{match.group(1) or ''}{(base / match.group(2)).resolve()}"


def _toml_loads(text: str) -> dict:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - the tomli dependency exists for 3.10
        import tomli as tomllib
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(str(exc)) from None
