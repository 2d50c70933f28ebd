"""``alignsearch serve``: load the index and its model, then run the API with uvicorn."""

from __future__ import annotations

import argparse
from pathlib import Path

from .settings import Settings


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    defaults = Settings()
    p = sub.add_parser("serve", help="serve an index over HTTP",
                       description="Start the search API. Settings default to ALIGNSEARCH_* environment variables.")
    p.add_argument("--index", type=Path, default=defaults.index, help="index folder (env ALIGNSEARCH_INDEX)")
    p.add_argument("--model", default=defaults.model,
                   help="model folder or name (default: the one named in the index manifest)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default=defaults.device, help="auto | cpu | cuda")
    p.add_argument("--api-key", default=defaults.api_key, help="require 'Authorization: Bearer KEY' (env ALIGNSEARCH_API_KEY)")
    p.add_argument("--max-batch", type=int, default=defaults.max_batch, help="micro-batch size (1 disables batching)")
    p.add_argument("--batch-wait-ms", type=float, default=defaults.batch_wait_ms,
                   help="how long a query waits for others to share its forward pass")
    p.add_argument("--max-upload-bytes", type=int, default=defaults.max_upload_bytes)
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from indexer.search import Searcher

    from .app import create_app

    settings = Settings(index=args.index, model=args.model, device=args.device, api_key=args.api_key,
                        max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms,
                        max_upload_bytes=args.max_upload_bytes)
    searcher = Searcher.open(settings.index, settings.model, settings.device)  # fails here, clearly, on a mismatch
    print(f"alignsearch: serving {settings.index} ({searcher.index.manifest['counts']}) "
          f"on http://{args.host}:{args.port}", flush=True)
    uvicorn.run(create_app(settings, searcher), host=args.host, port=args.port, log_level=args.log_level)
    return 0
