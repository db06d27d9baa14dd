"""`egm-edge serve`: an OpenAI-compatible grounding server on a bundle (see egm_edge.runtime.server)."""

from __future__ import annotations

import argparse

NAME = "serve"
HELP = "Serve a bundle over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/models, /health)."
ORDER = 20


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True, metavar="DIR", help="bundle built by `egm-edge build`")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=30000, help="port (default: 30000)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: no key)")
    p.add_argument("--max-queue", type=int, default=8, help="requests allowed to wait; beyond that 503 (default: 8)")
    p.add_argument("--request-timeout", type=float, default=120.0, metavar="S", help="seconds per request (default: 120)")
    p.add_argument("--max-body-mb", type=float, default=20.0, help="largest request body in MB (default: 20)")
    p.add_argument("--allow-remote-images", action="store_true",
                   help="let requests name http(s) image URLs that the server fetches (off by default)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores)")


def run(args: argparse.Namespace) -> int:
    import os

    from egm_edge.runtime.grounder import Grounder
    from egm_edge.runtime.server import ServerConfig, serve

    if args.max_queue < 0 or args.request_timeout <= 0 or args.max_body_mb <= 0:
        from egm_edge.errors import InputError

        raise InputError("--max-queue must be >= 0 and --request-timeout, --max-body-mb positive.")
    grounder = Grounder.open(args.bundle, threads=args.threads)
    cfg = ServerConfig(host=args.host, port=args.port, api_key=args.api_key or os.environ.get("EGM_EDGE_API_KEY"),
                       max_queue=args.max_queue, request_timeout_s=args.request_timeout,
                       max_body_bytes=int(args.max_body_mb * 1024 * 1024), allow_remote_images=args.allow_remote_images)
    server = serve(grounder, cfg)
    print(f"serving {grounder.model_name} on http://{cfg.host}:{server.server_address[1]}/v1 "
          f"(remote images {'allowed' if cfg.allow_remote_images else 'refused'})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
