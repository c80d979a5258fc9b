"""Registry errors named and numbered as ZooKeeper names them, each mapped once to an HTTP status."""

from __future__ import annotations

from typing import ClassVar

from app.errors import FleetmateError


class RegistryError(FleetmateError):
    """A ZooKeeper-style error: `code` is ZooKeeper's name, `zk_code` its number."""

    code = "SystemError"
    zk_code: ClassVar[int] = -1
    status = 500

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(message)
        self.path = path
        self.failed_index = -1  # inside a multi: which operation failed

    def detail(self) -> dict[str, object]:
        """What an HTTP error body adds: the path, the failing multi op, ZooKeeper's code."""
        out: dict[str, object] = {"zk_code": self.zk_code}
        if self.path:
            out["path"] = self.path
        if self.failed_index >= 0:
            out["failed_index"] = self.failed_index
        return out


class RuntimeInconsistency(RegistryError):
    """A multi operation failed because another operation in it failed (kazoo's RolledBack is -2 too)."""

    code = "RuntimeInconsistency"
    zk_code = -2
    status = 409


class Unimplemented(RegistryError):
    """The operation is not supported."""

    code = "Unimplemented"
    zk_code = -6
    status = 501


class OperationTimeout(RegistryError):
    """The operation did not complete in time (the log or the apply did not answer)."""

    code = "OperationTimeout"
    zk_code = -7
    status = 503


class BadArguments(RegistryError):
    """The request is malformed: bad path, oversize data, bad flags."""

    code = "BadArguments"
    zk_code = -8
    status = 400


class NoNode(RegistryError):
    """The node (or its parent) does not exist."""

    code = "NoNode"
    zk_code = -101
    status = 404


class NoAuth(RegistryError):
    """The ACL forbids the operation."""

    code = "NoAuth"
    zk_code = -102
    status = 403


class NoWatcher(RegistryError):
    """removeWatches/checkWatches found no such watch."""

    code = "NoWatcher"
    zk_code = -121
    status = 404


class BadVersion(RegistryError):
    """The expected version does not match the node's."""

    code = "BadVersion"
    zk_code = -103
    status = 412


class NoChildrenForEphemerals(RegistryError):
    """Ephemeral nodes cannot have children."""

    code = "NoChildrenForEphemerals"
    zk_code = -108
    status = 400


class NodeExists(RegistryError):
    """The node already exists."""

    code = "NodeExists"
    zk_code = -110
    status = 409


class NotEmpty(RegistryError):
    """The node has children."""

    code = "NotEmpty"
    zk_code = -111
    status = 409


class SessionExpired(RegistryError):
    """The session is unknown, closed or expired."""

    code = "SessionExpired"
    zk_code = -112
    status = 404


class InvalidACL(RegistryError):
    """The ACL is malformed."""

    code = "InvalidACL"
    zk_code = -114
    status = 400


class Compacted(RegistryError):
    """A watch asked to resume from a revision older than the event history keeps."""

    code = "Compacted"
    zk_code = -8
    status = 410


class StaleTerm(RegistryError):
    """A leader-only command carried an older lease term than the latest leader's (fenced)."""

    code = "StaleTerm"
    zk_code = -1
    status = 409


class Throttled(RegistryError):
    """Over the configured request rate."""

    code = "Throttled"
    zk_code = -127
    status = 429


class DiskFull(RegistryError):
    """A client write refused while the data directory is short of space (app/storage/diskspace.py).

    On the ZooKeeper port it is THROTTLEDOP (-127): not executed at all, retry with back-off.
    """

    code = "DiskFull"
    zk_code = -127
    status = 503


BY_ZK_CODE: dict[int, type[RegistryError]] = {
    cls.zk_code: cls
    for cls in (
        RuntimeInconsistency,
        Unimplemented,
        OperationTimeout,
        BadArguments,
        NoNode,
        NoAuth,
        BadVersion,
        NoChildrenForEphemerals,
        NodeExists,
        NotEmpty,
        SessionExpired,
        InvalidACL,
        Throttled,
    )
}


class LockTimeout(RegistryError):
    """The lock (or leadership) was not obtained within the wait; the contender node was withdrawn."""

    code = "LockTimeout"
    zk_code = -7
    status = 409
