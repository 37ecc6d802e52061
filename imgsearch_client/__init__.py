"""Python client library and `imgsearch` command line for the imgsearch services."""

from imgsearch_client.client import (
    ClientError,
    IndexClient,
    IngestItem,
    IngestOutcome,
    Neighbour,
)

__all__ = ["ClientError", "IndexClient", "IngestItem", "IngestOutcome", "Neighbour"]
