#!/usr/bin/env bash
# Run tests/inference against a real Roboflow Inference server. The server and pytest both run in a
# new network namespace whose only interface is loopback, so neither can reach any other host.
#
# Usage: scripts/inference/run_tests_in_netns.sh [pytest arguments]
# Needs unshare (util-linux), ip (iproute2), .venv and .venv-inference: `make test-inference`
# builds both venvs and then runs this script. It runs as root, or as another user where the
# kernel allows unprivileged user namespaces. Exits with pytest's status, or 2 when the server
# could not be started. The server log is test-output/inference/server.log, printed on failure.
set -euo pipefail

cd "$(dirname "$0")/../.."

VENV=${VENV:-.venv}
INFERENCE_VENV=${INFERENCE_VENV:-.venv-inference}
MODEL_DIR=${MODEL_DIR:-models/tiny-clip-random}
WORK_DIR=${WORK_DIR:-test-output/inference}
# Seconds that the server gets to start, load the model and embed a probe image.
READY_TIMEOUT_S=${READY_TIMEOUT_S:-180}
CLIP_VERSION_ID=ViT-B-32

if [[ "${_IMGSEARCH_INSIDE_NETNS:-}" != 1 ]]; then
    for tool in unshare ip; do
        if ! command -v "$tool" >/dev/null; then
            echo "run_tests_in_netns: $tool not found. Install util-linux and iproute2 (apt-get install -y iproute2)" >&2
            exit 2
        fi
    done
    # Root gets a plain network namespace. Other users get a user namespace that maps them to root inside it.
    unshare_options=(--net)
    if [[ $EUID -ne 0 ]]; then
        unshare_options=(--map-root-user --net)
    fi
    exec env _IMGSEARCH_INSIDE_NETNS=1 unshare "${unshare_options[@]}" "$0" "$@"
fi

ip link set lo up
interfaces=$(ip -o link show | awk -F': ' '{print $2}')
if [[ "$interfaces" != "lo" ]]; then
    echo "run_tests_in_netns: expected only the lo interface in the new namespace, found: $interfaces" >&2
    exit 2
fi

rm -rf "$WORK_DIR"
mkdir -p "$WORK_DIR"
WORK_DIR=$(cd "$WORK_DIR" && pwd)
SERVER_LOG="$WORK_DIR/server.log"

# Settings read by the inference package (inference/core/env.py in 1.8.3).
server_environment=(
    MODEL_CACHE_DIR="$WORK_DIR/model-cache"
    CLIP_VERSION_ID="$CLIP_VERSION_ID"
    # False selects the ONNX CLIP class inference.models.clip.clip_model.Clip, which reads
    # visual.onnx and textual.onnx from its folder under MODEL_CACHE_DIR.
    USE_INFERENCE_MODELS=False
    # Turns off downloads, usage telemetry, metrics, OpenTelemetry and the version check.
    OFFLINE_MODE=True
    METRICS_ENABLED=False
    DISABLE_VERSION_CHECK=True
    ACTIVE_LEARNING_ENABLED=False
    ENABLE_STREAM_API=False
    ALLOW_CUSTOM_PYTHON_EXECUTION_IN_WORKFLOWS=False
    # Routes of models that this venv lacks (SAM, SAM 3, YOLO-World) or that are deprecated (gaze)
    # stay off, which also removes their start-up warnings. Only the CLIP routes are needed.
    CORE_MODEL_SAM_ENABLED=False
    CORE_MODEL_SAM3_ENABLED=False
    CORE_MODEL_GAZE_ENABLED=False
    CORE_MODEL_YOLO_WORLD_ENABLED=False
    # Line width of the package's rich log handler. Without a terminal it wraps at 80 columns.
    COLUMNS=200
)

server_pid=
stop_server() {
    local status=$?
    if [[ -n "$server_pid" ]] && kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM "$server_pid"
        for _ in $(seq 50); do
            kill -0 "$server_pid" 2>/dev/null || break
            sleep 0.2
        done
        kill -KILL "$server_pid" 2>/dev/null || true
    fi
    if [[ $status -ne 0 && -f "$SERVER_LOG" ]]; then
        echo "----- Inference server log ($SERVER_LOG) -----" >&2
        cat "$SERVER_LOG" >&2
        echo "----- end of the Inference server log -----" >&2
    fi
    exit "$status"
}
trap stop_server EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if ! env "${server_environment[@]}" "$INFERENCE_VENV/bin/python" scripts/inference/place_clip_model.py "$MODEL_DIR" \
    >"$SERVER_LOG" 2>&1; then
    exit 2
fi

started=$SECONDS
env "${server_environment[@]}" "$INFERENCE_VENV/bin/python" scripts/inference/serve.py \
    --host 127.0.0.1 --port-file "$WORK_DIR/port" --workdir "$WORK_DIR/server" >>"$SERVER_LOG" 2>&1 &
server_pid=$!

if ! url=$("$VENV/bin/python" scripts/inference/wait_ready.py --port-file "$WORK_DIR/port" \
    --server-pid "$server_pid" --clip-version-id "$CLIP_VERSION_ID" --timeout-s "$READY_TIMEOUT_S"); then
    exit 2
fi
echo "run_tests_in_netns: Inference server ready at $url after $((SECONDS - started)) s"

IMGSEARCH_TEST_INFERENCE_URL=$url "$VENV/bin/python" -m pytest tests/inference -m inference "$@"
