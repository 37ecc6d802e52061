"""A fake IndexService that streams canned FindDuplicates responses, and image files for the groups' uris."""

import contextlib
import pathlib
import time
from concurrent import futures

import grpc

from imgsearch.index.v1 import index_service_pb2 as pb
from imgsearch.index.v1 import index_service_pb2_grpc
from tests.fakes.images import noise_png, solid_png


class FakeIndexService(index_service_pb2_grpc.IndexServiceServicer):
    """Streams responses in order and records each request.

    With abort_after set, the call aborts with abort_code once that many responses are sent.
    The fake sleeps delay_s before each response.
    """

    def __init__(self, responses: list[pb.FindDuplicatesResponse]):
        self.responses = responses
        self.requests: list[pb.FindDuplicatesRequest] = []
        self.abort_after: int | None = None
        self.abort_code = grpc.StatusCode.INVALID_ARGUMENT
        self.abort_message = "max_phash_distance must be at most 64"
        self.delay_s = 0.0

    def FindDuplicates(self, request, context):
        self.requests.append(request)
        for sent, response in enumerate(self.responses):
            if sent == self.abort_after:
                context.abort(self.abort_code, self.abort_message)
            time.sleep(self.delay_s)
            yield response
        if self.abort_after is not None and self.abort_after >= len(self.responses):
            context.abort(self.abort_code, self.abort_message)


@contextlib.contextmanager
def running(servicer: FakeIndexService):
    """Serve the fake on 127.0.0.1 with a free port and yield its HOST:PORT."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    index_service_pb2_grpc.add_IndexServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None).wait()


def member(item_id: str, uri: str, score=1.0, phash_distance=0, local_difference=0.0, size=(64, 48)):
    """Build one DuplicateMember message."""
    return pb.DuplicateMember(
        item_id=item_id, uri=uri, score=score, phash_distance=phash_distance,
        local_difference=local_difference, width=size[0], height=size[1],
    )


def write_photos(folder: pathlib.Path) -> dict[str, pathlib.Path]:
    """Write seeded image files for the canned groups and return them by item_id."""
    folder.mkdir(parents=True, exist_ok=True)
    images = {
        "a1": noise_png(64, 48, seed=1),
        "a2": noise_png(64, 48, seed=1),
        "b1": noise_png(320, 200, seed=2),
        "b2": noise_png(160, 100, seed=2),
        "c1": solid_png(40, 120, (40, 160, 90)),
    }
    paths = {}
    for item_id, image in images.items():
        paths[item_id] = folder / f"{item_id}.png"
        paths[item_id].write_bytes(image)
    return paths


def canned_stream(paths: dict[str, pathlib.Path]) -> list[pb.FindDuplicatesResponse]:
    """Return a typical stream: progress, an exact, a near and a similar group, then the summary.

    The similar group's second member has a uri that is not a local file, so the report shows a placeholder.
    """
    exact = pb.DuplicateGroup(kind=pb.MATCH_KIND_EXACT, members=[
        member("a1", str(paths["a1"])), member("a2", str(paths["a2"]), score=1.0),
    ])
    near = pb.DuplicateGroup(kind=pb.MATCH_KIND_NEAR, members=[
        member("b1", str(paths["b1"]), size=(320, 200)),
        member("b2", paths["b2"].as_uri(), score=0.987654, phash_distance=3, local_difference=0.4321, size=(160, 100)),
    ])
    similar = pb.DuplicateGroup(kind=pb.MATCH_KIND_SIMILAR, members=[
        member("c1", str(paths["c1"]), size=(40, 120)),
        member("remote-7", "https://images.example/7.jpg", score=0.9612, phash_distance=22, local_difference=2.5),
    ])
    summary = pb.FindDuplicatesSummary(
        item_count=9,
        group_counts={"MATCH_KIND_EXACT": 1, "MATCH_KIND_NEAR": 1, "MATCH_KIND_SIMILAR": 1},
        grouped_item_count=6,
    )
    return [
        pb.FindDuplicatesResponse(progress=pb.FindDuplicatesProgress(items_done=0, item_count=9)),
        pb.FindDuplicatesResponse(progress=pb.FindDuplicatesProgress(items_done=9, item_count=9)),
        pb.FindDuplicatesResponse(group=exact),
        pb.FindDuplicatesResponse(group=near),
        pb.FindDuplicatesResponse(group=similar),
        pb.FindDuplicatesResponse(summary=summary),
    ]
