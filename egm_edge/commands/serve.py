"""`egm-edge serve`: an OpenAI-compatible grounding server on a bundle (see egm_edge.runtime.server).

Every flag is checked, and the port bound once, before the bundle loads, so a
typo fails in one sentence at once instead of after seconds of loading.
"""

from __future__ import annotations

import argparse
import sys

NAME = "serve"
HELP = "Serve a bundle over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/models, /health)."
ORDER = 20
KEY_ENV = "EGM_EDGE_API_KEY"


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True, metavar="DIR", help="bundle built by `egm-edge build`")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=30000, help="port (default: 30000)")
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY'; visible in `ps`, so prefer --api-key-file or ${KEY_ENV}")
    p.add_argument("--api-key-file", default=None, metavar="PATH",
                   help=f"read the required bearer key from this file (default: ${KEY_ENV}, else no key)")
    p.add_argument("--max-queue", type=int, default=128,
                   help="requests allowed to wait besides those running; beyond that 503 with Retry-After (default: 128)")
    p.add_argument("--max-batch", type=int, default=8,
                   help="requests decoded together, one decoder call per step for all of them (default: 8; 1 = one at a time)")
    p.add_argument("--kv-budget-gb", type=float, default=None, metavar="GB",
                   help="memory the batch's KV cache may take before new requests wait (default: a quarter of the "
                        "memory available at start; a request that needs more runs alone)")
    p.add_argument("--request-timeout", type=float, default=120.0, metavar="S", help="seconds per request (default: 120)")
    p.add_argument("--read-timeout", type=float, default=30.0, metavar="S",
                   help="seconds a client has to send a request's headers and body; slower ones are dropped (default: 30)")
    p.add_argument("--max-connections", type=int, default=256,
                   help="open connections served at once; beyond that an immediate 503 (default: 256)")
    p.add_argument("--max-body-mb", type=float, default=20.0, help="largest request body in MB (default: 20)")
    p.add_argument("--decode-budget-mp", type=float, default=None, metavar="MP",
                   help="megapixels of images decoded at once across requests (default: 4x the bundle's max_pixels; "
                        "a larger image still decodes, alone)")
    p.add_argument("--allow-remote-images", action="store_true",
                   help="let requests name http(s) image URLs that the server fetches (off by default)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores)")
    p.add_argument("--verify", action="store_true",
                   help="re-hash every bundle file against its manifest before serving (default: only files whose size or times changed)")


def api_key(args: argparse.Namespace) -> str | None:
    """The bearer key from --api-key, --api-key-file or the environment (warning about the first)."""
    import os

    from egm_edge.errors import InputError

    if args.api_key is not None and args.api_key_file is not None:
        raise InputError("Both --api-key and --api-key-file were given; pass the key one way (--api-key-file keeps it out of `ps`).")
    if args.api_key is not None:
        print(f"egm-edge serve: warning: --api-key puts the key on the command line, visible to other users in `ps`; "
              f"use --api-key-file PATH or the {KEY_ENV} environment variable instead.", file=sys.stderr, flush=True)
        if not args.api_key.strip():
            raise InputError("--api-key is empty; pass a non-empty key, or leave the flag out to serve without one.")
        return args.api_key
    if args.api_key_file is not None:
        path = args.api_key_file
        try:
            with open(path, encoding="utf-8") as f:
                key = f.read().strip()
        except FileNotFoundError:
            raise InputError(f"--api-key-file {path} does not exist; write the key into that file (mode 600).") from None
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"--api-key-file {path} cannot be read ({getattr(e, 'strerror', None) or e}); check the path and its permissions.") from None
        if not key:
            raise InputError(f"--api-key-file {path} is empty; write the key on its first line.")
        if any(c.isspace() for c in key):
            raise InputError(f"--api-key-file {path} holds more than one word; write only the key.")
        return key
    return os.environ.get(KEY_ENV) or None


def run(args: argparse.Namespace) -> int:
    from egm_edge.errors import InputError
    from egm_edge.runtime.server import ServerConfig, check_listen, serve

    for flag, value, ok in [("--max-queue", args.max_queue, args.max_queue >= 0),
                            ("--max-batch", args.max_batch, args.max_batch > 0),
                            ("--kv-budget-gb", args.kv_budget_gb, args.kv_budget_gb is None or args.kv_budget_gb > 0),
                            ("--request-timeout", args.request_timeout, args.request_timeout > 0),
                            ("--read-timeout", args.read_timeout, args.read_timeout > 0),
                            ("--max-connections", args.max_connections, args.max_connections > 0),
                            ("--max-body-mb", args.max_body_mb, args.max_body_mb > 0),
                            ("--decode-budget-mp", args.decode_budget_mp, args.decode_budget_mp is None or args.decode_budget_mp > 0)]:
        if not ok:
            raise InputError(f"{flag} {value} is out of range; use a positive number{' (or 0)' if flag == '--max-queue' else ''}.")
    key = api_key(args)
    check_listen(args.host, args.port)

    from egm_edge.runtime.grounder import Grounder

    grounder = Grounder.open(args.bundle, threads=args.threads, verify=args.verify)
    budget = None if args.decode_budget_mp is None else int(args.decode_budget_mp * 1_000_000)
    kv = None if args.kv_budget_gb is None else int(args.kv_budget_gb * 1024**3)
    cfg = ServerConfig(host=args.host, port=args.port, api_key=key, max_queue=args.max_queue, max_batch=args.max_batch,
                       kv_budget_bytes=kv,
                       request_timeout_s=args.request_timeout, read_timeout_s=args.read_timeout,
                       max_connections=args.max_connections, max_body_bytes=int(args.max_body_mb * 1024 * 1024),
                       decode_pixel_budget=budget, allow_remote_images=args.allow_remote_images)
    server = serve(grounder, cfg)
    print(f"serving {grounder.model_name} on http://{cfg.host}:{server.server_address[1]}/v1 "
          f"(batches of up to {cfg.max_batch}, {cfg.max_queue} may wait; remote images {'allowed' if cfg.allow_remote_images else 'refused'}, "
          f"API key {'required' if key else 'off'})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
