"""The process's open-file limit, raised to its hard limit at start-up so connections get descriptors."""

from __future__ import annotations

import logging

log = logging.getLogger("fleetmate.serve")

RESERVED = 1024  # descriptors beside the HTTP connections: ZooKeeper clients, NATS, SQLite, logs


def raise_open_files(http_connections: int) -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; log the limit in force and return it.

    A shell's usual soft limit is 1,024 descriptors, which a thousand connections from one
    client use up: past it every accept fails, for everyone. The hard limit is what an
    unprivileged process may take. (Importing Granian 2.8's native module raises it too; this
    does not rely on that.) A limit still below `http_connections` plus RESERVED is logged as a
    warning naming http.max_connections.
    """
    try:
        import resource
    except ImportError:  # not a POSIX system
        return 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft == resource.RLIM_INFINITY or soft >= target:
        target = soft
        log.info("open-file limit", extra={"limit": soft, "hard": hard})
    else:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            log.info("open-file limit", extra={"limit": target, "hard": hard, "raised_from": soft})
        except (ValueError, OSError) as exc:
            log.warning("open-file limit could not be raised", extra={"limit": soft, "hard": hard, "error": str(exc)})
            target = soft
    if target != resource.RLIM_INFINITY and target < http_connections + RESERVED:
        log.warning(
            "open-file limit is below http.max_connections plus room for the rest",
            extra={"limit": target, "http.max_connections": http_connections, "reserved": RESERVED},
        )
    return int(target)
