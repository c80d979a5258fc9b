"""Installed database engine scan: finds MySQL/MariaDB, PostgreSQL and openGauss servers and their versions."""

from __future__ import annotations

import glob
import os
import re
import subprocess
from collections.abc import Sequence

from app.services.agent.messages import Engine, EngineFailure, EngineName, EngineScan


class EngineKind:
    """Where one family of server binaries lives and how to read its --version line."""

    def __init__(self, family: str, binaries: tuple[str, ...], dirs: tuple[str, ...], version_re: str) -> None:
        self.family = family
        self.binaries = binaries
        self.dirs = dirs  # glob patterns, searched before PATH
        self.version_re = re.compile(version_re)


KINDS: tuple[EngineKind, ...] = (
    EngineKind(
        "mysql",
        ("mysqld", "mariadbd"),
        ("/usr/sbin", "/usr/local/mysql/bin", "/usr/local/mariadb/bin", "/opt/mysql/*/bin", "/usr/libexec"),
        r"\bVer\s+(\d+(?:\.\d+)+)",
    ),
    EngineKind(
        "postgresql",
        ("postgres",),
        ("/usr/lib/postgresql/*/bin", "/usr/pgsql-*/bin", "/usr/local/pgsql/bin"),
        r"\((?:PostgreSQL|EnterpriseDB)\)\s+(\d+(?:\.\d+)*)",
    ),
    EngineKind(
        "opengauss",
        ("gaussdb",),
        ("/usr/local/opengauss/bin", "/opt/opengauss/bin", "/opt/software/openGauss/bin"),
        r"openGauss\s+(\d+(?:\.\d+)+)",
    ),
)

# Any dotted number not glued to a word or a path, for output the family regex does not know.
_ANY_VERSION = re.compile(r"(?<![\w./-])(\d+\.\d+(?:\.\d+)*)")


def parse_version(kind: EngineKind, line: str) -> tuple[EngineName, str]:
    """The engine name and bare version number ("10.11.19") in a --version line; "" if none."""
    engine: EngineName
    if kind.family == "mysql":
        engine = "mariadb" if "mariadb" in line.lower() else "mysql"
    elif kind.family == "postgresql":
        engine = "postgresql"
    else:
        engine = "opengauss"
    m = kind.version_re.search(line) or _ANY_VERSION.search(line)
    return engine, m.group(1) if m else ""


def _candidates(kind: EngineKind, extra_dirs: Sequence[str], path_dirs: Sequence[str]) -> list[str]:
    dirs: list[str] = []
    for pattern in (*extra_dirs, *kind.dirs):
        dirs.extend(sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern])
    dirs.extend(path_dirs)
    found: list[str] = []
    for d in dirs:
        for name in kind.binaries:
            # /sbin and /usr/sbin are one directory on merged-/usr systems: name each file once.
            p = os.path.join(os.path.realpath(d), name)
            if p not in found and os.path.isfile(p) and os.access(p, os.X_OK):
                found.append(p)
    return found


def _first_line(path: str, timeout: float) -> str:
    """Run `path --version` and return the first line it prints; raises RuntimeError with the cause."""
    env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C", "LANG": "C"}
    try:
        out = subprocess.run(
            [path, "--version"],
            capture_output=True,
            timeout=timeout,
            env=env,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{path} --version did not finish within {timeout:g} s") from None
    except OSError as e:
        raise RuntimeError(f"{path} --version could not start: {e.strerror or e}") from None
    text = (out.stdout or out.stderr).decode(errors="replace")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if out.returncode != 0 or not lines:
        detail = lines[0] if lines else "no output"
        raise RuntimeError(f"{path} --version exited with {out.returncode}: {detail}")
    return lines[0]


def scan_engines(
    extra_dirs: Sequence[str] = (),
    path: str | None = None,
    timeout: float = 5.0,
    kinds: Sequence[EngineKind] = KINDS,
) -> EngineScan:
    """Find installed server binaries and run each one's `--version` (at most `timeout` s each).

    Searched: extra_dirs first, then each family's usual directories, then PATH (the `path`
    argument, or $PATH). Names that resolve to the same file are reported once, under the real
    path, with the other names in `links`.
    """
    path_dirs = [d for d in (os.environ.get("PATH", "") if path is None else path).split(os.pathsep) if d]
    engines: list[Engine] = []
    failures: list[EngineFailure] = []
    for kind in kinds:
        by_real: dict[str, list[str]] = {}
        for found in _candidates(kind, extra_dirs, path_dirs):
            by_real.setdefault(os.path.realpath(found), []).append(found)
        for real, names in by_real.items():
            try:
                line = _first_line(real, timeout)
            except RuntimeError as e:
                failures.append(EngineFailure(real, str(e)))
                continue
            engine, version = parse_version(kind, line)
            links = tuple(sorted({n for n in names if n != real}))
            engines.append(Engine(engine, version, line, real, links))
    return EngineScan(tuple(engines), tuple(failures))
