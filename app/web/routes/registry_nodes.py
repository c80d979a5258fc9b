"""A node's GET and PUT, answered by the same two functions on both ways in: the Litestar routes
(app/web/routes/registry.py) and the lean path (app/web/fastpath.py)."""

from __future__ import annotations

from app.services.registry.service import RegistryService
from app.web.routes.registry_models import Encoding, NodeView, SetBody, StatView, decode_data, encode_data


async def get_node(
    registry: RegistryService, path: str, serializable: bool = False, encoding: Encoding | None = None
) -> NodeView:
    """Data and stat; data in UTF-8 when it is valid UTF-8 (or asked), else base64."""
    data, stat = await registry.get(path, linearizable=not serializable)
    text, used = encode_data(data, encoding)
    return NodeView(path, text, used, stat)


async def set_node(registry: RegistryService, path: str, body: SetBody) -> StatView:
    """Replace data when the version matches (-1: any)."""
    updated = await registry.set(path, decode_data(body.data, body.encoding), body.version)
    return StatView(updated.path, updated.stat)
