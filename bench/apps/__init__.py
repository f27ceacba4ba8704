"""The servers the HTTP benchmark loads: the bare ASGI ceiling, our node, and the original's node.

`bare` and `node` are served by `serve` (uvicorn, in-process, uvloop + httptools); `original` is a script run by
the original's own virtual environment. Nothing here measures anything: `bench.http_load` does.
"""
