"""Generate the tiny CLIP-shaped test model: random seeded weights, exported to ONNX.

The output folder has the layout that the embed service's onnx backend and the Roboflow Inference
server's model cache both read: visual.onnx (input NCHW float32 [batch, 3, 224, 224]) and textual.onnx
(input int32 [batch, 77]), both with a 512-d projection, plus imgsearch-model.json. Its embeddings
carry no meaning; it exists so that tests and the offline demo run the real loading code.

Needs torch==2.13.0 (CPU) and transformers in a separate virtual environment; see `make tiny-clip`.
"""

import argparse
import json
import pathlib

import torch
from transformers import CLIPConfig, CLIPModel

_SEED = 20261204
_EMBED_DIM = 512
_CONTEXT_LENGTH = 77
_CLIP_VOCAB_SIZE = 49408


class _VisualTower(torch.nn.Module):
    def __init__(self, model: CLIPModel):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        outputs = self.model.vision_model(pixel_values=pixel_values)
        return self.model.visual_projection(outputs.pooler_output)


class _TextualTower(torch.nn.Module):
    def __init__(self, model: CLIPModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        ids = input_ids.to(torch.int64)
        outputs = self.model.text_model(input_ids=ids)
        return self.model.text_projection(outputs.pooler_output)


def build_model() -> CLIPModel:
    """Build a 2-layer CLIP with CLIP ViT-B/32's input and output shapes and seeded random weights."""
    torch.manual_seed(_SEED)
    config = CLIPConfig(
        projection_dim=_EMBED_DIM,
        text_config={
            "vocab_size": _CLIP_VOCAB_SIZE,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": _CONTEXT_LENGTH,
            # The end-of-text id of CLIP's BPE vocabulary, where the text tower pools.
            "eos_token_id": 49407,
        },
        vision_config={
            "image_size": 224,
            "patch_size": 32,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
        },
    )
    model = CLIPModel(config).eval()
    _spread_weights(model)
    return model


def _spread_weights(model: CLIPModel) -> None:
    """Re-draw every matrix with std 1/sqrt(fan_in).

    With the default std of 0.02, the class token dominates the pooled output and random images all
    land within a cosine of about 0.94 of each other; larger weights let the pixels matter more.
    """
    generator = torch.Generator().manual_seed(_SEED)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() < 2 or ("embedding" in name and "patch" not in name):
                continue
            fan_in = parameter[0].numel()
            parameter.copy_(torch.randn(parameter.shape, generator=generator) / fan_in**0.5)


def export(model: CLIPModel, out_dir: pathlib.Path) -> None:
    """Write visual.onnx, textual.onnx and imgsearch-model.json into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pixels = torch.zeros(1, 3, 224, 224, dtype=torch.float32)
    tokens = torch.zeros(1, _CONTEXT_LENGTH, dtype=torch.int32)
    with torch.no_grad():
        torch.onnx.export(
            _VisualTower(model), (pixels,), str(out_dir / "visual.onnx"),
            input_names=["pixel_values"], output_names=["image_embeds"],
            dynamic_axes={"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}},
            opset_version=17, dynamo=False,
        )
        torch.onnx.export(
            _TextualTower(model), (tokens,), str(out_dir / "textual.onnx"),
            input_names=["input_ids"], output_names=["text_embeds"],
            dynamic_axes={"input_ids": {0: "batch"}, "text_embeds": {0: "batch"}},
            opset_version=17, dynamo=False,
        )
    metadata = {
        "model_id": "tiny-clip-random-v1",
        "random_weights": True,
        "dim": _EMBED_DIM,
        "image_size": 224,
        "context_length": _CONTEXT_LENGTH,
        "source": "scripts/make_tiny_clip.py, seed %d" % _SEED,
    }
    (out_dir / "imgsearch-model.json").write_text(json.dumps(metadata, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("models/tiny-clip-random"),
                        help="folder to write the model files into")
    args = parser.parse_args()
    export(build_model(), args.out)


if __name__ == "__main__":
    main()
