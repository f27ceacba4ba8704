"""The cluster dashboard's page (SPEC 14): `/` redirects to `/ui/`, which serves three files shipped in the package.

The page holds no data, so it is open like the probes; every call it makes goes through the guard like any
other. Its answers forbid what a page that shows data from other machines must never do: run inline or
foreign script (`Content-Security-Policy: default-src 'self'`), be framed (`frame-ancestors 'none'`), or be
sniffed as another type (`nosniff`). Knows Starlette and the files, nothing of the coordinator.
"""

from __future__ import annotations

from importlib import resources

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

__all__ = ["UI_PATHS", "ui_routes"]

_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

# What each shipped file is served as (and the only files served).
_ASSETS = {
    "": ("index.html", "text/html; charset=utf-8"),
    "app.js": ("app.js", "text/javascript; charset=utf-8"),
    "style.css": ("style.css", "text/css; charset=utf-8"),
    "favicon.svg": ("favicon.svg", "image/svg+xml"),
}

UI_PATHS = ("/", "/ui", *(f"/ui/{name}" for name in _ASSETS))


def _read(name: str) -> bytes:
    return resources.files(__package__).joinpath("ui", name).read_bytes()


async def root(request: Request) -> Response:
    return RedirectResponse(request.scope.get("root_path", "") + "/ui/", status_code=307)


async def asset(request: Request) -> Response:
    name = request.path_params.get("asset", "")
    entry = _ASSETS.get(name)
    if entry is None:
        return Response(status_code=404, headers=_SECURITY_HEADERS)
    filename, media_type = entry
    return Response(_read(filename), media_type=media_type, headers=_SECURITY_HEADERS)


def ui_routes() -> list[Route]:
    """`/` and `/ui` redirect to `/ui/`; `/ui/`, `/ui/app.js`, `/ui/style.css` and its icon are the page."""
    return [
        Route("/", root, methods=["GET"]),
        Route("/ui", root, methods=["GET"]),
        Route("/ui/", asset, methods=["GET"]),
        Route("/ui/{asset}", asset, methods=["GET"]),
    ]
