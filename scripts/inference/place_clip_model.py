"""Copy CLIP ONNX files into the model cache folder where the Roboflow Inference server looks for them.

Run it with the Python of .venv-inference and the same MODEL_CACHE_DIR and CLIP_VERSION_ID as the
server. The folder name comes from the package itself: the server loads the model "clip/" +
CLIP_VERSION_ID and reads its files from inference.core.cache.model_artifacts.get_cache_dir() of
that id. In 1.8.3 that is MODEL_CACHE_DIR/~clip-<version>-<blake2s digest of the id>, because an id
with capital letters is not used as a raw path. With both files there, no download is attempted.
"""

import argparse
import shutil
from pathlib import Path

# The files that inference.models.clip.clip_model.Clip opens from its cache folder.
_MODEL_FILES = ("visual.onnx", "textual.onnx")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path, help="folder with visual.onnx and textual.onnx")
    args = parser.parse_args()

    missing = [name for name in _MODEL_FILES if not (args.model_dir / name).is_file()]
    if missing:
        raise SystemExit(f"{args.model_dir} is missing {', '.join(missing)}. Run make tiny-clip to build them")

    # Imported after the checks because the import takes several seconds. It reads MODEL_CACHE_DIR
    # and CLIP_VERSION_ID from the environment.
    from inference.core.cache.model_artifacts import get_cache_dir
    from inference.core.env import CLIP_MODEL_ID

    cache_dir = Path(get_cache_dir(model_id=CLIP_MODEL_ID))
    cache_dir.mkdir(parents=True, exist_ok=True)
    for name in _MODEL_FILES:
        # Copies, not links: in OFFLINE_MODE the server rejects a cache folder that contains symlinks.
        shutil.copyfile(args.model_dir / name, cache_dir / name)
    print(cache_dir)


if __name__ == "__main__":
    main()
