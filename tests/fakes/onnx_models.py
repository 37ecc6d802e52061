"""Throwaway CLIP-shaped ONNX models, built with the onnx helper API, for backend tests.

Each model takes `pixel_values` of shape (batch, 3, side, side) and returns a (batch, dim)
embedding: the per-channel means and standard deviations of the image, times a seeded matrix.
The output depends on the colours, so different pictures give different vectors.
"""

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

_OPSET = 17
# ONNX Runtime rejects IR versions newer than it knows. 1.20, the oldest allowed here, reads IR 8.
_IR_VERSION = 8


def write_model(
    folder: Path,
    dim: int = 16,
    side: int | str = 224,
    batch: int | str = "batch",
    embedding_output: str = "image_embeds",
    leading_outputs: tuple[str, ...] = (),
    seed: int = 0,
) -> Path:
    """Write folder/visual.onnx and return its path.

    The embedding comes out of `embedding_output`. Each name in leading_outputs is an extra
    output, listed before the embedding, that returns the negated embedding. A string side or
    batch makes that dimension symbolic; an int fixes it.
    """
    weights = np.random.default_rng(seed).standard_normal((6, dim)).astype(np.float32)
    nodes = [
        helper.make_node("ReduceMean", ["pixel_values"], ["means"], axes=[2, 3], keepdims=0),
        helper.make_node("Unsqueeze", ["means", "spatial_axes"], ["means_4d"]),
        helper.make_node("Sub", ["pixel_values", "means_4d"], ["centred"]),
        helper.make_node("Mul", ["centred", "centred"], ["squares"]),
        helper.make_node("ReduceMean", ["squares"], ["variances"], axes=[2, 3], keepdims=0),
        helper.make_node("Sqrt", ["variances"], ["deviations"]),
        helper.make_node("Concat", ["means", "deviations"], ["features"], axis=1),
        helper.make_node("MatMul", ["features", "weights"], [embedding_output]),
    ]
    nodes += [helper.make_node("Neg", [embedding_output], [name]) for name in leading_outputs]

    output_names = list(leading_outputs) + [embedding_output]
    graph = helper.make_graph(
        nodes,
        "throwaway_clip_visual",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, [batch, 3, side, side])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [batch, dim]) for name in output_names],
        initializer=[
            numpy_helper.from_array(weights, "weights"),
            numpy_helper.from_array(np.array([2, 3], dtype=np.int64), "spatial_axes"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)])
    model.ir_version = _IR_VERSION
    onnx.checker.check_model(model)

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "visual.onnx"
    onnx.save(model, path)
    return path
