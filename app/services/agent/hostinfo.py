"""Host figures for heartbeats: CPU, memory, swap, disks per mount, load and uptime, via psutil."""

from __future__ import annotations

import os
import socket
import time

import psutil

from app.services.agent.messages import DiskUsage, HostInfo


def disks() -> tuple[DiskUsage, ...]:
    """Usage of each physical file system (one row per mount point), the root always included."""
    seen: set[str] = set()
    rows: list[DiskUsage] = []
    parts = psutil.disk_partitions(all=False)
    mounts = [(p.mountpoint, p.device, p.fstype) for p in parts]
    if not any(m == "/" for m, _, _ in mounts):
        # In a container the root is often an overlay, which psutil counts as virtual.
        mounts.insert(0, ("/", "rootfs", ""))
    for mount, device, fstype in mounts:
        # Bind-mounted files (/etc/hosts in a container) show up as partitions; only directories count.
        if mount in seen or not os.path.isdir(mount):
            continue
        seen.add(mount)
        try:
            usage = psutil.disk_usage(mount)
        except OSError:
            continue
        rows.append(DiskUsage(mount, device, fstype, usage.total, usage.used, usage.free, usage.percent))
    return tuple(rows)


def host_info(cpu_interval: float | None = None) -> HostInfo:
    """Read the host's figures now.

    cpu_interval None measures CPU use since the previous call in this process (the first call
    in a process reports 0.0); a number blocks that many seconds to measure it.
    """
    now = time.time()
    mem = psutil.virtual_memory()
    swap = psutil.swap_memory()
    load1, load5, load15 = psutil.getloadavg()
    boot = psutil.boot_time()
    return HostInfo(
        hostname=socket.gethostname(),
        time=now,
        cpu_percent=psutil.cpu_percent(interval=cpu_interval),
        cpu_cores=psutil.cpu_count(logical=True) or 1,
        cpu_physical_cores=psutil.cpu_count(logical=False),
        memory_total=mem.total,
        memory_available=mem.available,
        memory_used=mem.used,
        memory_percent=mem.percent,
        swap_total=swap.total,
        swap_used=swap.used,
        swap_percent=swap.percent,
        load1=load1,
        load5=load5,
        load15=load15,
        boot_time=boot,
        uptime=max(0.0, now - boot),
        disks=disks(),
    )
