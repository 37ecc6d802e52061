# One image for both services; the command picks the service:
#   docker build -t imgsearch .
#   docker run --rm -p 50051:50051 imgsearch serve embed
#   docker run --rm -p 50052:50052 -e IMGSEARCH_INDEX_EMBED_ADDR=HOST:50051 imgsearch serve index
# Without other settings the embed service runs the bundled tiny random model with the onnx backend,
# so the image works offline; its embeddings carry no meaning (see README, "Real CLIP weights").

# The build stage installs the project into a virtual environment, which the runtime stage copies
# without the source tree or pip's build files. Both stages use the same base image, so the
# virtual environment's interpreter path stays valid.
FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/imgsearch/venv

WORKDIR /src
COPY pyproject.toml README.md ./
COPY imgsearch ./imgsearch
COPY imgsearch_common ./imgsearch_common
COPY imgsearch_client ./imgsearch_client
COPY embed_service ./embed_service
COPY index_service ./index_service
RUN /opt/imgsearch/venv/bin/pip install .


FROM python:3.11-slim

# A fixed non-root uid, so that files in bind mounts have a predictable owner. /data/index is
# created here with that owner, because Docker fills a new named volume from the image's folder
# at the mount point, ownership included.
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/imgsearch imgsearch \
    && mkdir -p /data/index \
    && chown imgsearch:imgsearch /data/index

COPY --from=build /opt/imgsearch/venv /opt/imgsearch/venv
COPY models/tiny-clip-random /opt/imgsearch/models/tiny-clip-random

# In a container the services listen on every interface; outside one they default to 127.0.0.1.
ENV PATH=/opt/imgsearch/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    IMGSEARCH_EMBED_LISTEN=0.0.0.0:50051 \
    IMGSEARCH_EMBED_MODEL_DIR=/opt/imgsearch/models/tiny-clip-random \
    IMGSEARCH_INDEX_LISTEN=0.0.0.0:50052 \
    IMGSEARCH_INDEX_DATA_DIR=/data/index

USER imgsearch
WORKDIR /home/imgsearch
EXPOSE 50051 50052

ENTRYPOINT ["imgsearch"]
CMD ["--help"]
