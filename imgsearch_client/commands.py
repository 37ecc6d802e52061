"""The `imgsearch` subcommands, built on the client library; cli.py only parses their arguments."""

import collections
import dataclasses
import json
import pathlib
import sys
from collections.abc import Mapping

import grpc
from tqdm import tqdm

from imgsearch_client.arguments import item_filter_of
from imgsearch_client.client import ClientError, IndexClient, IngestItem, Neighbour, check_health
from imgsearch_client.files import find_images
from imgsearch_client.grid import draw_grid
from imgsearch_common.config import ConfigError
from imgsearch_common.errors import FailedPreconditionError
from imgsearch_common.logs import configure_logging
from imgsearch_common.security import channel_credentials, check_token


class CommandError(Exception):
    """A command failed; the message is printed as one line."""


@dataclasses.dataclass(frozen=True)
class Connection:
    """TLS files and bearer token with which a command reaches a service; all optional."""

    tls_ca: pathlib.Path | None = None
    tls_cert: pathlib.Path | None = None
    tls_key: pathlib.Path | None = None
    token: str = dataclasses.field(default="", repr=False)

    def credentials(self) -> grpc.ChannelCredentials | None:
        """Build TLS credentials from the files. Raises CommandError, naming the flag, for a file that cannot be used."""
        try:
            return channel_credentials(self.tls_ca, self.tls_cert, self.tls_key, _TLS_FLAG_NAMES)
        except ConfigError as error:
            raise CommandError(str(error)) from None

    def client(self, addr: str, **options) -> IndexClient:
        """Open an IndexClient to addr with this connection's TLS and token; options go to IndexClient."""
        if self.token:
            try:
                check_token("--token or IMGSEARCH_TOKEN", self.token)
            except ConfigError as error:
                raise CommandError(str(error)) from None
        return IndexClient(addr, credentials=self.credentials(), token=self.token, **options)


_TLS_FLAG_NAMES = ("--tls-ca or IMGSEARCH_TLS_CA", "--tls-cert or IMGSEARCH_TLS_CERT", "--tls-key or IMGSEARCH_TLS_KEY")


@dataclasses.dataclass(frozen=True)
class MetadataChange:
    """The change that update-metadata requests: keys to set, keys to delete, and whether the set keys replace all others."""

    set_values: Mapping[str, str]
    remove_keys: tuple[str, ...] = ()
    replace: bool = False


@dataclasses.dataclass(frozen=True)
class DuplicatePolicy:
    """The duplicate policy that ingest sends, empty strings taking the server's defaults, and metadata for every item."""

    on_duplicate: str = ""
    duplicate_match: str = ""
    metadata: Mapping[str, str] = dataclasses.field(default_factory=dict)


def serve(service: str, environ: Mapping[str, str], overrides: Mapping[str, object]) -> int:
    """Run the embed or index service in the foreground until SIGTERM or SIGINT."""
    if service == "embed":
        from embed_service import config as service_config
        from embed_service import server as service_server
    else:
        from index_service import config as service_config
        from index_service import server as service_server
    paths = {key: pathlib.Path(value) for key, value in overrides.items() if key.endswith("_dir")}
    try:
        config = dataclasses.replace(service_config.from_env(environ), **{**overrides, **paths})
    except ConfigError as error:
        raise CommandError(str(error)) from None
    configure_logging(config.log_level)
    try:
        service_server.run(config)
    except (ConfigError, RuntimeError, OSError, FailedPreconditionError) as error:
        # Start-up failures: a port in use, a data folder that cannot be opened or is locked, or one
        # that holds another model's embeddings than the embed service runs.
        raise CommandError(f"the {service} service could not start: {error}") from None
    return 0


def ingest(
    addr: str,
    paths: list[str],
    as_json: bool,
    timeout_s: float | None,
    policy: DuplicatePolicy = DuplicatePolicy(),
    connection: Connection = Connection(),
) -> int:
    """Stream every image under paths to the index service; return 1 when any item failed."""
    try:
        files = list(find_images(paths))
    except FileNotFoundError as error:
        raise CommandError(str(error)) from None
    counts = collections.Counter({"added": 0, "already_present": 0, "failed": 0})
    read_errors: list[CommandError] = []

    with connection.client(addr) as client, tqdm(total=len(files), unit="image", desc="ingest", file=sys.stderr) as bar:
        try:
            for outcome in client.ingest(_items(files, read_errors, policy), timeout_s=timeout_s):
                counts[outcome.status] += 1
                bar.update()
                _report_outcome(outcome, as_json, bar)
        except ClientError as error:
            raise CommandError(f"ingest stopped after {bar.n} of {len(files)} images: {error}") from None
    if read_errors:
        raise read_errors[0]

    summary = {"summary": True, "total": len(files), **counts}
    if as_json:
        print(json.dumps(summary), flush=True)
    else:
        print(f"{len(files)} images: {counts['added']} added, {counts['already_present']} already present, "
              f"{counts['failed']} failed")
    return 1 if counts["failed"] else 0


def _items(files: list[pathlib.Path], read_errors: list[CommandError], policy: DuplicatePolicy):
    """Yield an IngestItem per file; a file that cannot be read ends the stream and is kept in read_errors."""
    for path in files:
        try:
            image = _read(path)
        except CommandError as error:
            read_errors.append(error)
            return
        yield IngestItem(
            image=image,
            uri=str(path.resolve()),
            on_duplicate=policy.on_duplicate,
            duplicate_match=policy.duplicate_match,
            metadata=policy.metadata,
        )


def _read(path: pathlib.Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise CommandError(f"cannot read {path}: {error.strerror}") from None


def _report_outcome(outcome, as_json: bool, bar: tqdm) -> None:
    if as_json:
        record = {"uri": outcome.uri, "item_id": outcome.item_id, "status": outcome.status}
        if outcome.duplicate_of_item_id:
            record["duplicate_of"] = {"item_id": outcome.duplicate_of_item_id, "match": outcome.duplicate_match}
        if outcome.failed:
            record["error"] = {"code": outcome.error_code, "message": outcome.error_message}
        bar.clear()
        print(json.dumps(record), flush=True)
        bar.refresh()
    elif outcome.failed:
        bar.write(f"failed: {outcome.uri}: {outcome.error_code}: {outcome.error_message}", file=sys.stderr)


def search(args, connection: Connection = Connection()) -> int:
    """Search with an image file, a stored item_id or a text, and print the neighbours, best first."""
    query = _read(pathlib.Path(args.image)) if args.image else None
    with connection.client(args.addr, timeout_s=args.timeout) as client:
        try:
            neighbours = client.search(
                image=query, item_id=args.item_id, text=args.text, k=args.k, min_score=args.min_score,
                item_filter=item_filter_of(args.where, args.uri_prefix), nprobe=args.nprobe, ef_search=args.ef_search,
            )
        except (ClientError, ValueError) as error:
            raise CommandError(str(error)) from None

    if args.json:
        print(json.dumps(neighbours_to_json(neighbours), indent=2))
    elif not neighbours:
        print("no neighbours found: the collection is empty, or the filter or min-score left every item out",
              file=sys.stderr)
    else:
        for rank, neighbour in enumerate(neighbours, start=1):
            print(f"{rank:3d}  {neighbour.score:+.4f}  {neighbour.match:<11}  {neighbour.item_id}  {neighbour.uri}")
    if args.grid:
        _write_grid(query, neighbours, args.grid)
    return 0


def _write_grid(query: bytes | None, neighbours: list[Neighbour], out: pathlib.Path) -> None:
    tiles = [(_read_if_local(n.uri), f"{n.score:.4f}") for n in neighbours]
    try:
        draw_grid(query, tiles, out)
    except (OSError, ValueError) as error:
        raise CommandError(f"cannot write the grid to {out}: {error}") from None


def neighbours_to_json(neighbours: list[Neighbour]) -> dict[str, list[dict[str, object]]]:
    """Return the JSON document that `search --json` prints."""
    return {"neighbours": [dataclasses.asdict(neighbour) for neighbour in neighbours]}


def _read_if_local(uri: str) -> bytes | None:
    path = pathlib.Path(uri)
    return path.read_bytes() if uri and path.is_file() else None


def stats(addr: str, as_json: bool, timeout_s: float, connection: Connection = Connection()) -> int:
    """Print the collection's statistics."""
    with connection.client(addr, timeout_s=timeout_s) as client:
        try:
            values = client.stats()
        except ClientError as error:
            raise CommandError(str(error)) from None
    if as_json:
        print(json.dumps(values))
    else:
        for key, value in values.items():
            print(f"{key}: {value}")
    return 0


def health(addr: str, service: str, as_json: bool, timeout_s: float, connection: Connection = Connection()) -> int:
    """Print the health status of a service; return 0 only when it is SERVING. Health checks send no token."""
    try:
        status = check_health(addr, service, timeout_s, credentials=connection.credentials())
    except ClientError as error:
        if error.code == "NOT_FOUND":
            raise CommandError(f"{addr} has no health status for service {service!r}") from None
        raise CommandError(f"health check of {addr} failed: {error}") from None
    print(json.dumps({"addr": addr, "service": service, "status": status}) if as_json else status)
    return 0 if status == "SERVING" else 1


def remove(addr: str, item_ids: list[str], as_json: bool, timeout_s: float, connection: Connection = Connection()) -> int:
    """Remove items by item_id and print how many went, and which item_ids named no stored item."""
    with connection.client(addr, timeout_s=timeout_s) as client:
        try:
            outcome = client.remove_items(item_ids)
        except ClientError as error:
            raise CommandError(str(error)) from None
    if as_json:
        print(json.dumps({"removed_count": outcome.removed_count, "not_found_item_ids": list(outcome.not_found_item_ids)}))
        return 0
    print(f"removed {outcome.removed_count} items")
    if outcome.not_found_item_ids:
        print(f"not found: {', '.join(outcome.not_found_item_ids)}")
    return 0


def update_metadata(
    addr: str, item_id: str, change: MetadataChange, as_json: bool, timeout_s: float,
    connection: Connection = Connection(),
) -> int:
    """Change one item's metadata and print the metadata it has afterwards."""
    with connection.client(addr, timeout_s=timeout_s) as client:
        try:
            metadata = client.update_metadata(item_id, change.set_values, change.remove_keys, change.replace)
        except ClientError as error:
            raise CommandError(str(error)) from None
    if as_json:
        print(json.dumps({"item_id": item_id, "metadata": metadata}, sort_keys=True))
    else:
        for key, value in sorted(metadata.items()):
            print(f"{key}: {value}")
    return 0


def fetch_model(model: str, out: pathlib.Path, force: bool, as_json: bool = False) -> int:
    """Download real CLIP ONNX files into out."""
    from imgsearch_client import model_fetch

    try:
        model_fetch.fetch_clip_onnx(model, out, overwrite=force)
    except (model_fetch.FetchError, ValueError) as error:
        raise CommandError(str(error)) from None
    if as_json:
        files = sorted(path.name for path in out.iterdir() if path.is_file())
        print(json.dumps({"model": model, "out": str(out), "files": files}))
    else:
        print(f"wrote {model} to {out}")
    return 0
