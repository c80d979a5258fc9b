"""The registry's SQLite file as offline tools see it (`fleetmate restore`): its position, installing an image."""

from __future__ import annotations

from pathlib import Path

from app.services.registry.store import RegistryStore, image_position, rebase_image

__all__ = ["image_position", "install", "position", "rebase_image"]


def position(path: Path, history: int) -> tuple[int, int]:
    """(applied sequence, revision) the file at `path` holds."""
    store = RegistryStore(path, history)
    try:
        return store.position()
    finally:
        store.close()


def install(path: Path, history: int, image: bytes, log_id: str) -> None:
    """Replace the file's state with a snapshot image, recorded as following the log `log_id`."""
    store = RegistryStore(path, history)
    try:
        store.install(image)
        store.set_log_id(log_id)
    finally:
        store.close()
