"""KV errors, each with its code and HTTP status (mapped once by app/web/errors.py)."""

from __future__ import annotations

from app.errors import BadRequest, FleetmateError, NotFound


class KvError(FleetmateError):
    """Anything the KV refuses; a refused command changes nothing."""

    code = "kv_error"
    status = 500


class BadKvRequest(BadRequest, KvError):
    """The request is malformed: an empty or oversize key or value, a bad range."""

    code = "bad_request"


class NoSuchShard(NotFound, KvError):
    """No shard by that id here."""

    code = "no_such_shard"


class KeyNotFound(NotFound, KvError):
    """The key does not exist."""

    code = "key_not_found"


class RevisionMismatch(KvError):
    """A compare-and-set found another revision than the one given."""

    code = "revision_mismatch"
    status = 409

    def __init__(self, message: str, key: str = "", revision: int = 0) -> None:
        super().__init__(message)
        self.key = key
        self.revision = revision


class CrossShard(BadRequest, KvError):
    """A batch names keys of more than one shard."""

    code = "cross_shard"


class StaleEpoch(KvError):
    """The write was routed with an older view of the shard (a split or merge came first): route again."""

    code = "stale_epoch"
    status = 503

    def __init__(self, message: str, shard: int = 0, epoch: int = 0) -> None:
        super().__init__(message)
        self.shard = shard
        self.epoch = epoch


class NotHeld(KvError):
    """This replica holds no copy of the shard (the router sends the request to one that does)."""

    code = "not_held"
    status = 503


class Refused(KvError):
    """The command cannot run on the shard as it is (a split key outside its range, a merge of non-neighbours)."""

    code = "refused"
    status = 409


class Unreachable(KvError):
    """No replica holding the key's shard could be reached: the request was not run (safe to send again)."""

    code = "unreachable"
    status = 503
