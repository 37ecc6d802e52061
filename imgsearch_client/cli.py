"""The `imgsearch` command line: run the services, ingest folders, search, and inspect."""

import argparse
import os
import pathlib
import sys

from imgsearch_client import commands, dupes
from imgsearch_client.arguments import (
    add_filter_options,
    host_port,
    listen_address,
    non_negative_int,
    positive_float,
    positive_int,
    score,
    search_text,
)

DEFAULT_EMBED_ADDR = "127.0.0.1:50051"
DEFAULT_INDEX_ADDR = "127.0.0.1:50052"

_EXIT_STATUS = """exit status:
  0  success
  1  {failure}
  2  invalid command line
"""
_CALL_FAILED = "the call failed"


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the epilog's line breaks and shows each option's default."""


def build_parser() -> argparse.ArgumentParser:
    """Build the parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="imgsearch",
        description="Image similarity search over gRPC: CLIP embeddings in a faiss index.",
        epilog=_EXIT_STATUS.format(failure="the command failed, or at least one ingested item failed"),
        formatter_class=_HelpFormatter,
    )
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_serve(subcommands)
    _add_ingest(subcommands)
    _add_search(subcommands)
    duplicates = _subparser(subcommands, "dupes", "find groups of exact, near or similar duplicates")
    dupes.add_arguments(duplicates, DEFAULT_INDEX_ADDR)
    _add_connection(duplicates)
    stats = _add_simple(subcommands, "stats", "print the collection's item count, dim and model", DEFAULT_INDEX_ADDR)
    _add_connection(stats)
    health = _add_simple(
        subcommands, "health", "check a service's gRPC health; exit 0 when SERVING", DEFAULT_INDEX_ADDR,
        failure="the service is not SERVING, or the check failed",
    )
    health.add_argument("--service", default="", help="service name to check; empty means the whole server")
    _add_connection(health, token=False)
    _add_remove(subcommands)
    _add_update_metadata(subcommands)
    _add_fetch_model(subcommands)
    return parser


def _subparser(subcommands, name: str, help_text: str, failure: str = _CALL_FAILED) -> argparse.ArgumentParser:
    parser = subcommands.add_parser(
        name, help=help_text, description=help_text, epilog=_EXIT_STATUS.format(failure=failure),
        formatter_class=_HelpFormatter,
    )
    # Checks that argparse cannot express report through the subcommand's own usage line.
    parser.set_defaults(command_parser=parser)
    return parser


def _add_serve(subcommands) -> None:
    serve = _subparser(subcommands, "serve", "run a service until SIGTERM or SIGINT", "the service failed to start")
    services = serve.add_subparsers(dest="service", required=True, metavar="SERVICE")
    embed = _subparser(services, "embed", "run the embed service (settings: IMGSEARCH_EMBED_* env vars)",
                       "the service failed to start")
    # No defaults here: an option left out keeps the value of the env var or the config's default.
    embed.add_argument("--listen", default=argparse.SUPPRESS, type=listen_address,
                       help=f"HOST:PORT to listen on [env default: {DEFAULT_EMBED_ADDR}]")
    embed.add_argument("--backend", default=argparse.SUPPRESS, choices=["onnx", "inference", "hash"],
                       help="embedding backend [env default: onnx]")
    embed.add_argument("--model-dir", default=argparse.SUPPRESS, help="folder with visual.onnx, for the onnx backend "
                                           "[env default: models/tiny-clip-random]")
    index = _subparser(services, "index", "run the index service (settings: IMGSEARCH_INDEX_* env vars)",
                       "the service failed to start")
    index.add_argument("--listen", default=argparse.SUPPRESS, type=listen_address,
                       help=f"HOST:PORT to listen on [env default: {DEFAULT_INDEX_ADDR}]")
    index.add_argument("--embed-addr", default=argparse.SUPPRESS, type=host_port,
                       help=f"HOST:PORT of the embed service [env default: {DEFAULT_EMBED_ADDR}]")
    index.add_argument("--data-dir", default=argparse.SUPPRESS,
                       help="folder of the durable store [env default: data/index]")


def _add_ingest(subcommands) -> None:
    ingest = _subparser(subcommands, "ingest", "stream image files and folders into the index",
                        "the call failed, or at least one item failed")
    ingest.add_argument("paths", nargs="+", metavar="PATH", help="image file or folder (searched recursively)")
    ingest.add_argument("--addr", type=host_port, default=DEFAULT_INDEX_ADDR, help="HOST:PORT of the index service")
    ingest.add_argument("--json", action="store_true", help="print one JSON object per item, then a summary")
    ingest.add_argument("--timeout", type=positive_float, default=None,
                        help="deadline of the whole stream in seconds; none by default")
    ingest.add_argument("--on-duplicate", choices=["add", "skip", "reject"],
                        help="what to do with an image that duplicates a stored item [server default: skip]")
    ingest.add_argument("--duplicate-match", choices=["exact", "near"],
                        help="which matches count as duplicates [server default: exact]")
    ingest.add_argument("--metadata", action="append", type=_key_value, default=[], metavar="KEY=VALUE",
                        help="metadata stored with every image of this call, for example tag=dog; repeatable")
    _add_connection(ingest)


def _add_search(subcommands) -> None:
    search = _subparser(subcommands, "search", "find the stored images closest to a query image or text")
    search.add_argument("image", nargs="?", metavar="IMAGE", help="query image file")
    search.add_argument("--item-id", help="search with a stored item instead of an image file")
    search.add_argument("--text", type=search_text,
                        help='search with a text instead of an image file, for example "a dog on a sofa"')
    search.add_argument("--addr", type=host_port, default=DEFAULT_INDEX_ADDR, help="HOST:PORT of the index service")
    search.add_argument("-k", type=non_negative_int, default=10, help="number of neighbours; 0 means the server's default")
    search.add_argument("--min-score", type=score, help="leave out neighbours scoring below this cosine, in [-1, 1]")
    search.add_argument("--json", action="store_true", help="print the neighbours as JSON")
    search.add_argument("--grid", type=pathlib.Path, help="write the query beside its neighbours to this PNG file")
    add_filter_options(search)
    search.add_argument("--nprobe", type=positive_int, help="IVF lists visited; more finds more true neighbours")
    search.add_argument("--ef-search", type=positive_int, help="HNSW candidate list size; more finds more")
    search.add_argument("--timeout", type=positive_float, default=30.0, help="deadline of the call in seconds")
    _add_connection(search)


def _add_connection(parser: argparse.ArgumentParser, token: bool = True) -> None:
    group = parser.add_argument_group("TLS and authentication")
    group.add_argument("--tls-ca", type=pathlib.Path,
                       help="PEM CA bundle that verifies the server's certificate; any --tls-* option turns on TLS "
                            "[env: IMGSEARCH_TLS_CA]")
    group.add_argument("--tls-cert", type=pathlib.Path,
                       help="PEM client certificate for mutual TLS, with --tls-key [env: IMGSEARCH_TLS_CERT]")
    group.add_argument("--tls-key", type=pathlib.Path,
                       help="PEM private key of --tls-cert [env: IMGSEARCH_TLS_KEY]")
    if token:
        group.add_argument("--token", help="bearer token sent with every call; prefer the env var, because other "
                                           "users can see command lines [env: IMGSEARCH_TOKEN]")


def _add_simple(subcommands, name: str, help_text: str, default_addr: str, failure: str = _CALL_FAILED):
    parser = _subparser(subcommands, name, help_text, failure)
    parser.add_argument("--addr", type=host_port, default=default_addr, help="HOST:PORT of the service")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--timeout", type=positive_float, default=10.0, help="deadline of the call in seconds")
    return parser


def _add_remove(subcommands) -> None:
    remove = _add_simple(
        subcommands, "remove", "remove items by item_id; a removed item's item_id is never reused", DEFAULT_INDEX_ADDR
    )
    remove.add_argument("item_ids", nargs="+", metavar="ITEM_ID",
                        help="item_id of an item to remove; item_ids that name no item are listed, not failures")
    _add_connection(remove)


def _add_update_metadata(subcommands) -> None:
    update = _add_simple(subcommands, "update-metadata", "set or remove metadata keys of one item", DEFAULT_INDEX_ADDR)
    update.add_argument("item_id", metavar="ITEM_ID", help="item_id of the item to change")
    update.add_argument("--set", dest="set_values", action="append", type=_key_value, default=[], metavar="KEY=VALUE",
                        help="set KEY to VALUE (split at the first =); repeat for more keys")
    update.add_argument("--remove-key", dest="remove_keys", action="append", default=[], metavar="KEY",
                        help="delete KEY; repeat for more keys")
    update.add_argument("--replace", action="store_true", help="make the --set pairs the item's whole metadata")
    _add_connection(update)


def _key_value(value: str) -> tuple[str, str]:
    key, separator, text = value.partition("=")
    if not separator or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with a non-empty KEY, got {value!r}")
    return key, text


def _check_update_metadata(args: argparse.Namespace) -> None:
    """Reject an update-metadata command line that changes nothing or contradicts itself, with exit status 2."""
    set_keys = [key for key, _ in args.set_values]
    if not (set_keys or args.remove_keys or args.replace):
        args.command_parser.error("give at least one of --set, --remove-key or --replace")
    if args.replace and args.remove_keys:
        args.command_parser.error("--remove-key cannot go with --replace, which drops every key not in --set")
    both = sorted(set(set_keys) & set(args.remove_keys))
    if both:
        args.command_parser.error(f"key {both[0]!r} is in both --set and --remove-key")


def _add_fetch_model(subcommands) -> None:
    fetch = _subparser(subcommands, "fetch-model", "download real CLIP ONNX weights (needs internet)",
                       "the download failed")
    fetch.add_argument("--model", default="ViT-B-32", help="ViT-B-32 or ViT-B-16")
    fetch.add_argument("--out", type=pathlib.Path, required=True, help="folder to write the model files into")
    fetch.add_argument("--force", action="store_true", help="overwrite files that are already there")
    fetch.add_argument("--json", action="store_true", help="print the model folder and its files as JSON")


def main(argv: list[str] | None = None) -> int:
    """Run one command and return its exit status."""
    args = build_parser().parse_args(argv)
    if args.command == "search" and [args.image, args.item_id, args.text].count(None) != 2:
        args.command_parser.error("give either an IMAGE file or --item-id or --text, and only one of them")
    if args.command == "update-metadata":
        _check_update_metadata(args)
    try:
        return _dispatch(args)
    except commands.CommandError as error:
        print(f"imgsearch: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader of stdout went away, as `imgsearch stats | head -1` does; Python would print a
        # traceback when it flushes stdout at exit, so stdout is pointed at /dev/null first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "serve":
        overrides = {key: value for key, value in vars(args).items() if value is not None}
        for key in ("command", "command_parser"):
            overrides.pop(key)
        service = overrides.pop("service")
        return commands.serve(service, os.environ, overrides)
    if args.command == "ingest":
        policy = commands.DuplicatePolicy(args.on_duplicate or "", args.duplicate_match or "", dict(args.metadata))
        return commands.ingest(args.addr, args.paths, as_json=args.json, timeout_s=args.timeout, policy=policy,
                               connection=_connection(args, os.environ))
    if args.command == "search":
        return commands.search(args, _connection(args, os.environ))
    if args.command == "dupes":
        return dupes.run(args, _connection(args, os.environ))
    if args.command == "stats":
        return commands.stats(args.addr, as_json=args.json, timeout_s=args.timeout,
                              connection=_connection(args, os.environ))
    if args.command == "health":
        return commands.health(args.addr, args.service, as_json=args.json, timeout_s=args.timeout,
                               connection=_connection(args, os.environ))
    if args.command == "remove":
        return commands.remove(args.addr, args.item_ids, as_json=args.json, timeout_s=args.timeout,
                               connection=_connection(args, os.environ))
    if args.command == "update-metadata":
        change = commands.MetadataChange(dict(args.set_values), tuple(args.remove_keys), args.replace)
        return commands.update_metadata(args.addr, args.item_id, change, as_json=args.json, timeout_s=args.timeout,
                                        connection=_connection(args, os.environ))
    return commands.fetch_model(args.model, args.out, force=args.force, as_json=args.json)


def _connection(args: argparse.Namespace, environ) -> commands.Connection:
    """Take each TLS file and the token from its flag, or else from its IMGSEARCH_ env var."""

    def _path(flag_value, variable):
        value = flag_value if flag_value is not None else environ.get(variable, "")
        return pathlib.Path(value) if value else None

    token = getattr(args, "token", None)
    return commands.Connection(
        tls_ca=_path(args.tls_ca, "IMGSEARCH_TLS_CA"),
        tls_cert=_path(args.tls_cert, "IMGSEARCH_TLS_CERT"),
        tls_key=_path(args.tls_key, "IMGSEARCH_TLS_KEY"),
        token=token if token is not None else environ.get("IMGSEARCH_TOKEN", ""),
    )


if __name__ == "__main__":
    sys.exit(main())
