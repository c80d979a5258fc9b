"""Log cleanup by retention rules: plan and run deletions safely inside one directory per rule."""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePath

import msgspec

from app.services.agent.messages import LogCleanReport, LogFile, LogRule, SkippedFile

_DAY = 86400.0


class _Candidate(msgspec.Struct, frozen=True):
    path: str
    size: int
    mtime: float
    dev: int
    ino: int


class _Survey(msgspec.Struct):
    candidates: list[_Candidate]
    skipped: list[SkippedFile]
    error: str | None = None


def _check_rule(rule: LogRule) -> None:
    for name in ("keep_days", "keep_total_bytes", "keep_newest"):
        value = getattr(rule, name)
        if value is not None and value < 0:
            raise ValueError(f"{name} must not be negative, got {value}")
    pattern = PurePath(rule.pattern)
    if not rule.pattern or pattern.is_absolute() or ".." in pattern.parts:
        raise ValueError(f"pattern must be a glob relative to the directory without '..', got {rule.pattern!r}")


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _survey(rule: LogRule) -> _Survey:
    """Match the rule's pattern and sort the matches into deletable regular files and skipped paths."""
    try:
        root = Path(rule.directory).resolve(strict=True)
    except OSError as e:
        return _Survey([], [], f"directory {rule.directory!r} cannot be read: {e.strerror or e}")
    if not root.is_dir():
        return _Survey([], [], f"{rule.directory!r} is not a directory")
    root_s = str(root)
    out = _Survey([], [])
    for p in sorted(root.glob(rule.pattern)):
        path = str(p)
        try:
            st = os.lstat(path)
        except OSError:
            continue  # vanished between listing and looking
        if stat.S_ISLNK(st.st_mode):
            target = os.path.realpath(path)
            where = "inside" if _inside(target, root_s) else "outside"
            out.skipped.append(SkippedFile(path, f"symlink to {target} ({where} the directory); links are left alone"))
            continue
        if stat.S_ISDIR(st.st_mode):
            out.skipped.append(SkippedFile(path, "directory; directories are never deleted"))
            continue
        if not stat.S_ISREG(st.st_mode):
            out.skipped.append(SkippedFile(path, "not a regular file"))
            continue
        real = os.path.realpath(path)
        if real != path:
            # A parent directory on the way is a symlink (the glob went through it).
            where = "inside" if _inside(real, root_s) else "outside"
            out.skipped.append(SkippedFile(path, f"reached through a symlinked directory; the file is {where} it"))
            continue
        out.candidates.append(_Candidate(path, st.st_size, st.st_mtime, st.st_dev, st.st_ino))
    return out


def open_for_writing(wanted: set[tuple[int, int]]) -> tuple[dict[tuple[int, int], int], bool]:
    """Which of the wanted (st_dev, st_ino) files some process holds open for writing, with one such pid.

    Reads /proc/<pid>/fd and /proc/<pid>/fdinfo. The flag is False when some process's
    descriptors could not be read (not root), so a writer may have been missed.
    """
    held: dict[tuple[int, int], int] = {}
    complete = True
    if not wanted:
        return held, complete
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fd_dir = f"/proc/{entry.name}/fd"
        try:
            fds = os.listdir(fd_dir)
        except FileNotFoundError:
            continue
        except PermissionError:
            complete = False
            continue
        for fd in fds:
            try:
                if not os.readlink(f"{fd_dir}/{fd}").startswith("/"):
                    continue  # socket:[..], pipe:[..], anon_inode:..
                st = os.stat(f"{fd_dir}/{fd}")
                key = (st.st_dev, st.st_ino)
                if key not in wanted or key in held:
                    continue
                with open(f"/proc/{entry.name}/fdinfo/{fd}") as f:
                    flags = next((int(ln.split()[1], 8) for ln in f if ln.startswith("flags:")), 0)
            except (OSError, ValueError, IndexError):
                continue
            if flags & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR):
                held[key] = int(entry.name)
    return held, complete


def _decide(rule: LogRule, now: float, files: list[_Candidate], held: set[tuple[int, int]]) -> dict[str, str]:
    """Pure retention: path -> reason for every file the rule removes (held files never chosen).

    A file goes if older than keep_days, OR beyond the newest keep_newest, OR needed (oldest
    first) to bring the total of what remains down to keep_total_bytes. Held files stay and count.
    """
    newest_first = sorted(files, key=lambda c: (c.mtime, c.path), reverse=True)
    doomed: dict[str, str] = {}
    if rule.keep_days is not None:
        for c in newest_first:
            if now - c.mtime > rule.keep_days * _DAY:
                doomed[c.path] = f"older than {rule.keep_days:g} days"
    if rule.keep_newest is not None:
        for c in newest_first[rule.keep_newest :]:
            doomed.setdefault(c.path, f"beyond the newest {rule.keep_newest}")
    held_paths = {c.path for c in files if (c.dev, c.ino) in held}
    doomed = {p: r for p, r in doomed.items() if p not in held_paths}
    if rule.keep_total_bytes is not None:
        total = sum(c.size for c in files if c.path not in doomed)
        for c in reversed(newest_first):
            if total <= rule.keep_total_bytes:
                break
            if c.path in doomed or (c.dev, c.ino) in held:
                continue
            doomed[c.path] = f"needed to bring the total to {rule.keep_total_bytes} bytes or less"
            total -= c.size
    return doomed


def _report(rule: LogRule, now: float, dry_run: bool) -> LogCleanReport:
    _check_rule(rule)
    survey = _survey(rule)
    if survey.error is not None:
        return LogCleanReport(rule, now, dry_run, 0, 0, (), tuple(survey.skipped), 0, True, survey.error)
    files = survey.candidates
    nothing_set = rule.keep_days is None and rule.keep_newest is None and rule.keep_total_bytes is None
    held, complete = ({}, True) if nothing_set else open_for_writing({(c.dev, c.ino) for c in files})
    # The verdict as if nothing were held open tells which held files were spared, for the report.
    spared = _decide(rule, now, files, set()) if held else {}
    doomed = {} if nothing_set else _decide(rule, now, files, set(held))
    skipped = list(survey.skipped)
    for c in files:
        pid = held.get((c.dev, c.ino))
        if pid is not None and c.path in spared and c.path not in doomed:
            skipped.append(SkippedFile(c.path, f"open for writing by pid {pid}"))
    deleted = [LogFile(c.path, c.size, c.mtime, doomed[c.path]) for c in files if c.path in doomed]
    deleted.sort(key=lambda f: (f.mtime, f.path))
    if not dry_run:
        if complete:
            deleted = _delete(deleted, {c.path: c for c in files}, skipped)
        else:
            # Not every process's open files were visible (not root): a file held open for
            # writing could be among these, so none is deleted.
            reason = "not deleted: could not see every process's open files (run the agent as root)"
            skipped.extend(SkippedFile(f.path, reason) for f in deleted)
            deleted = []
    return LogCleanReport(
        rule=rule,
        time=now,
        dry_run=dry_run,
        considered=len(files),
        kept=len(files) - len(deleted),
        deleted=tuple(deleted),
        skipped=tuple(skipped),
        bytes_freed=sum(f.size for f in deleted),
        open_check_complete=complete,
    )


def _delete(planned: list[LogFile], by_path: dict[str, _Candidate], skipped: list[SkippedFile]) -> list[LogFile]:
    """Unlink each planned file unless it changed since the survey; failures go to skipped."""
    done: list[LogFile] = []
    for f in planned:
        c = by_path[f.path]
        try:
            st = os.lstat(f.path)
            if (st.st_dev, st.st_ino) != (c.dev, c.ino) or os.path.realpath(f.path) != f.path:
                skipped.append(SkippedFile(f.path, "changed since it was examined"))
                continue
            os.unlink(f.path)
        except FileNotFoundError:
            skipped.append(SkippedFile(f.path, "already gone"))
            continue
        except OSError as e:
            skipped.append(SkippedFile(f.path, f"could not delete: {e.strerror or e}"))
            continue
        done.append(f)
    return done


def plan(rule: LogRule, now: float) -> LogCleanReport:
    """What `run` would delete at time `now` (seconds since the epoch); changes nothing."""
    return _report(rule, now, dry_run=True)


def run(rule: LogRule, now: float, dry_run: bool = False) -> LogCleanReport:
    """Apply the rule at time `now`: delete what it selects (nothing when dry_run) and report.

    Only regular files inside the rule's resolved directory are deleted; symlinks, directories,
    paths reached through symlinked directories and files a process holds open for writing
    are left alone. Raises ValueError for a malformed rule.
    """
    return _report(rule, now, dry_run)
