"""The `imgsearch` command line: run the services, ingest folders, search, and inspect."""

import argparse
import os
import pathlib
import sys

from imgsearch_client import commands

DEFAULT_EMBED_ADDR = "127.0.0.1:50051"
DEFAULT_INDEX_ADDR = "127.0.0.1:50052"

_EPILOG = """exit status:
  0  success
  1  the call failed, or at least one ingested item failed
  2  invalid command line
"""


def build_parser() -> argparse.ArgumentParser:
    """Build the parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="imgsearch",
        description="Image similarity search over gRPC: CLIP embeddings in a faiss index.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_serve(subcommands)
    _add_ingest(subcommands)
    _add_search(subcommands)
    _add_simple(subcommands, "stats", "print the collection's item count, dim and model", DEFAULT_INDEX_ADDR)
    health = _add_simple(subcommands, "health", "check a service's gRPC health; exit 0 when SERVING", DEFAULT_INDEX_ADDR)
    health.add_argument("--service", default="", help="service name to check (default: the whole server)")
    _add_fetch_model(subcommands)
    return parser


def _subparser(subcommands, name: str, help_text: str) -> argparse.ArgumentParser:
    return subcommands.add_parser(
        name, help=help_text, description=help_text, epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _add_serve(subcommands) -> None:
    serve = _subparser(subcommands, "serve", "run a service until SIGTERM or SIGINT")
    services = serve.add_subparsers(dest="service", required=True, metavar="SERVICE")
    embed = _subparser(services, "embed", "run the embed service (settings: IMGSEARCH_EMBED_* env vars)")
    embed.add_argument("--listen", help=f"HOST:PORT to listen on (default {DEFAULT_EMBED_ADDR})")
    embed.add_argument("--backend", choices=["onnx", "inference", "hash"], help="embedding backend (default onnx)")
    embed.add_argument("--model-dir", help="folder with visual.onnx, for the onnx backend")
    index = _subparser(services, "index", "run the index service (settings: IMGSEARCH_INDEX_* env vars)")
    index.add_argument("--listen", help=f"HOST:PORT to listen on (default {DEFAULT_INDEX_ADDR})")
    index.add_argument("--embed-addr", help=f"HOST:PORT of the embed service (default {DEFAULT_EMBED_ADDR})")
    index.add_argument("--data-dir", help="folder of the durable store (default data/index)")


def _add_ingest(subcommands) -> None:
    ingest = _subparser(subcommands, "ingest", "stream image files and folders into the index")
    ingest.add_argument("paths", nargs="+", metavar="PATH", help="image file or folder (searched recursively)")
    ingest.add_argument("--addr", default=DEFAULT_INDEX_ADDR, help="HOST:PORT of the index service")
    ingest.add_argument("--json", action="store_true", help="print one JSON object per item, then a summary")
    ingest.add_argument("--timeout", type=float, default=None, help="deadline of the whole stream in seconds")


def _add_search(subcommands) -> None:
    search = _subparser(subcommands, "search", "find the stored images closest to a query image")
    search.add_argument("image", nargs="?", metavar="IMAGE", help="query image file")
    search.add_argument("--item-id", help="search with a stored item instead of an image file")
    search.add_argument("--addr", default=DEFAULT_INDEX_ADDR, help="HOST:PORT of the index service")
    search.add_argument("-k", type=int, default=10, help="number of neighbours (default 10)")
    search.add_argument("--min-score", type=float, help="leave out neighbours scoring below this cosine")
    search.add_argument("--json", action="store_true", help="print the neighbours as JSON")
    search.add_argument("--grid", type=pathlib.Path, help="write the query beside its neighbours to this PNG")
    search.add_argument("--timeout", type=float, default=30.0, help="deadline of the call in seconds")


def _add_simple(subcommands, name: str, help_text: str, default_addr: str) -> argparse.ArgumentParser:
    parser = _subparser(subcommands, name, help_text)
    parser.add_argument("--addr", default=default_addr, help="HOST:PORT of the service")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--timeout", type=float, default=10.0, help="deadline of the call in seconds")
    return parser


def _add_fetch_model(subcommands) -> None:
    fetch = _subparser(subcommands, "fetch-model", "download real CLIP ONNX weights (needs internet)")
    fetch.add_argument("--model", default="ViT-B-32", help="ViT-B-32 or ViT-B-16 (default ViT-B-32)")
    fetch.add_argument("--out", type=pathlib.Path, required=True, help="folder to write the model files into")
    fetch.add_argument("--force", action="store_true", help="overwrite files that are already there")


def main(argv: list[str] | None = None) -> int:
    """Run one command and return its exit status."""
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except commands.CommandError as error:
        print(f"imgsearch: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "serve":
        overrides = {key: value for key, value in vars(args).items() if value is not None}
        overrides.pop("command")
        service = overrides.pop("service")
        return commands.serve(service, os.environ, overrides)
    if args.command == "ingest":
        return commands.ingest(args.addr, args.paths, as_json=args.json, timeout_s=args.timeout)
    if args.command == "search":
        return commands.search(args)
    if args.command == "stats":
        return commands.stats(args.addr, as_json=args.json, timeout_s=args.timeout)
    if args.command == "health":
        return commands.health(args.addr, args.service, as_json=args.json, timeout_s=args.timeout)
    return commands.fetch_model(args.model, args.out, force=args.force)


if __name__ == "__main__":
    sys.exit(main())
