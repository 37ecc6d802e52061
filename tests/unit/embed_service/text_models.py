"""Throwaway CLIP-shaped text models, built with the onnx helper API, that show the ids they were given.

Each model takes `input_ids` of shape (batch, context), and optionally `attention_mask` of the same
shape, and returns the first `dim` ids as floats, plus the mask's first `dim` values when it takes
one. So the direction of the embedding shows which ids and mask the embedder fed in.
"""

from pathlib import Path

import onnx
from onnx import TensorProto, helper, numpy_helper

import numpy as np

_OPSET = 17
# ONNX Runtime rejects IR versions newer than it supports. 1.20, the oldest allowed here, reads IR 8.
_IR_VERSION = 8


def write_text_model(
    folder: Path,
    dim: int = 16,
    ids_type: int = TensorProto.INT64,
    context: int | str = "sequence",
    with_mask: bool = False,
    ids_name: str = "input_ids",
    output_name: str = "text_embeds",
) -> Path:
    """Write folder/textual.onnx and return its path. A string context makes that dimension symbolic."""
    inputs = [helper.make_tensor_value_info(ids_name, ids_type, ["batch", context])]
    nodes = [
        helper.make_node("Cast", [ids_name], ["ids_float"], to=TensorProto.FLOAT),
        helper.make_node("Slice", ["ids_float", "starts", "ends", "axes"], ["ids_head"]),
    ]
    summed = "ids_head"
    if with_mask:
        inputs.append(helper.make_tensor_value_info("attention_mask", ids_type, ["batch", context]))
        nodes += [
            helper.make_node("Cast", ["attention_mask"], ["mask_float"], to=TensorProto.FLOAT),
            helper.make_node("Slice", ["mask_float", "starts", "ends", "axes"], ["mask_head"]),
            helper.make_node("Add", ["ids_head", "mask_head"], ["ids_and_mask"]),
        ]
        summed = "ids_and_mask"
    nodes.append(helper.make_node("Identity", [summed], [output_name]))

    graph = helper.make_graph(
        nodes,
        "throwaway_clip_textual",
        inputs,
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["batch", dim])],
        initializer=[
            numpy_helper.from_array(np.array([0], dtype=np.int64), "starts"),
            numpy_helper.from_array(np.array([dim], dtype=np.int64), "ends"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "axes"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)])
    model.ir_version = _IR_VERSION
    onnx.checker.check_model(model)

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "textual.onnx"
    onnx.save(model, path)
    return path
