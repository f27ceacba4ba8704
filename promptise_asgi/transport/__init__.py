"""The node transport: one runtime, remotely manageable over HTTP, embeddable anywhere.

`create_transport_app` builds the Starlette app (mount it in FastAPI/Starlette, or serve it with any ASGI
server); `node_lifespan` starts and stops the runtime for a host app, since mounted apps get no lifespan
events; `RuntimeTransport` serves the app in-process with uvicorn (or hypercorn, which also runs on trio), and
`AppServer` does the same for any ASGI app (a coordinator, say). The runtime is known only through the
Protocols in `_shape`.
"""

from __future__ import annotations

from .._server import AppServer
from ._app import create_transport_app, node_lifespan
from ._standalone import RuntimeTransport

__all__ = ["AppServer", "RuntimeTransport", "create_transport_app", "node_lifespan"]
