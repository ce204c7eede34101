"""``shpeft serve``: the command line of the server (uvicorn on a socket bound here).

Kept light: the web stack is imported when the command runs, not when the CLI parser is built.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket
import sys
from collections.abc import Callable

API_KEY_ENV = "SHPEFT_API_KEY"

log = logging.getLogger("shpeft.serve")


def add_serve_parser(sub, commands: dict[str, Callable[[argparse.Namespace], int]]) -> None:
    """Add ``serve`` to the CLI's subparsers and its handler to ``commands``."""
    p = sub.add_parser(
        "serve",
        help="serve runs over HTTP: one shared backbone per base, every task as its delta",
        description="Serve trained runs as an HTTP API and a web page. Each distinct base "
        "backbone is loaded once; every task is kept as its delta and written into the shared "
        "backbone for its batches (then reverted). Endpoints: GET /, /health, /tasks, "
        "/docs, /openapi.json; POST /predict/{task} and POST /predict (every task) with the "
        "image in the multipart field 'file'.",
    )
    p.add_argument(
        "--runs",
        nargs="+",
        required=True,
        metavar="RUN_DIR|NAME=RUN_DIR",
        help="run directories written by `shpeft train`; a task is named after its folder "
        "unless given as NAME=RUN_DIR",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default: loopback only; any other address needs an API key)",
    )
    p.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port)")
    p.add_argument(
        "--api-key",
        default=None,
        help=f"key every request must carry (X-API-Key, Bearer or Basic password); default: "
        f"${API_KEY_ENV}. Prefer the variable: arguments are visible to other users in ps",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--max-batch", type=int, default=32, help="most images in one forward pass")
    p.add_argument(
        "--batch-wait-ms",
        type=float,
        default=0.0,
        help="wait this long for more requests to batch with the first (0: batch what is queued)",
    )
    p.add_argument("--max-upload-mb", type=float, default=32.0, help="largest upload accepted")
    p.add_argument(
        "--max-pixels",
        type=int,
        default=40_000_000,
        help="largest image accepted, in pixels (guards against decompression bombs)",
    )
    p.add_argument("--decode-threads", type=int, default=2, help="threads decoding uploads")
    p.add_argument(
        "--heatmap",
        default="grad-rollout",
        choices=("grad-rollout", "rollout"),
        help="attribution of the page's heat maps (shpeft.explain)",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=64,
        help="concurrent connections before new ones get 503 (bounds upload memory)",
    )
    p.add_argument(
        "--merged",
        action="store_true",
        help="comparison baseline: one full (merged where possible) model per task instead of "
        "shared backbones; N tasks then cost N backbones",
    )
    commands["serve"] = cmd_serve


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket (bound here, so a busy port is a one-line error)."""
    family, kind, proto, _, addr = socket.getaddrinfo(
        host.strip("[]"), port, type=socket.SOCK_STREAM
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    sock.set_inheritable(True)
    return sock


def cmd_serve(args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    from shpeft.serve.app import LOOPBACK_HOSTS, ServeSettings, create_app
    from shpeft.serve.registry import RunRef, load_registry

    key = args.api_key or os.environ.get(API_KEY_ENV) or None
    loopback = is_loopback(args.host)
    if not loopback and key is None:
        raise ValueError(
            f"binding to {args.host} makes the server reachable from other machines; give an "
            f"API key with ${API_KEY_ENV} (or --api-key)"
        )
    settings = ServeSettings(
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        max_pixels=args.max_pixels,
        api_key=key,
        allowed_hosts=LOOPBACK_HOSTS if loopback and key is None else None,
        decode_threads=args.decode_threads,
        max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms,
        heatmap=args.heatmap,
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    registry = load_registry(
        [RunRef.parse(r) for r in args.runs], device=args.device, share=not args.merged
    )
    sock = bind(args.host, args.port)
    port = sock.getsockname()[1]
    host = f"[{args.host.strip('[]')}]" if ":" in args.host else args.host
    refused = "".join(f"\n  refused {r.name}: {r.reason}" for r in registry.refused.values())
    print(
        f"shpeft serve: {len(registry.tasks)} task(s) on {len(registry.bases)} backbone(s) at "
        f"http://{host}:{port}/{refused}",
        file=sys.stderr,
        flush=True,
    )
    config = uvicorn.Config(
        create_app(registry, settings),
        log_config=None,
        log_level="warning",
        access_log=False,
        server_header=False,
        limit_concurrency=args.max_connections,
        timeout_graceful_shutdown=5,
    )
    uvicorn.Server(config).run(sockets=[sock])
    return 0
