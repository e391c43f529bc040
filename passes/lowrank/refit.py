"""Reconstruction after factoring: refit each layer's last factor to the original layer's outputs.

A factored layer computes (x A) B; the error it adds compounds with the
errors of the factored layers before it. With ``reconstruct``, the last
factor of every layer (B and the bias: a MatMul, a Gemm or a 1x1 Conv) is
refit in graph order by ridge regression on the inputs it really gets in
the factored model (H = x_p A, earlier refits applied) against what the
original layer output on the original model (Y, the teacher):

    [B'; b'] = argmin ||H B' + b' - Y||^2 + lambda ||.||^2

As in prune's reconstruction (passes/prune/reconstruct.py), a refit is kept
only if one fitted on the even calibration samples beats the factors as
they are on the odd ones.
"""

from __future__ import annotations

__all__ = ["refit_last_factors"]

import numpy as np
import onnx_ir as ir

from graphopt.runtime import ModelRunner
from passes.prune.layer_checks import NONFINITE_INPUTS, finite
from passes.prune.reconstruct import Grams, checked_fit, independent_prefix, output_grams, ridge_solve
from passes.qdq.samples import Samples


def refit_last_factors(
    model: ir.Model, teacher: ir.Model, outputs: list[str], samples: Samples, threads: int | None
) -> tuple[list[str], dict[str, str]]:
    """Refits the nodes of ``model`` that produce ``outputs``; returns (refit node names, {name: why not})."""
    producers = {value.name: node for node in model.graph for value in node.outputs}
    position = {node: index for index, node in enumerate(model.graph)}
    pending = sorted((producers[name] for name in outputs if name in producers), key=position.__getitem__)
    refused = {node.name or "": "not a MatMul, Gemm or 1x1 Conv with a constant weight" for node in pending if _weight(node) is None}
    # The fit targets the teacher's output, bias included: a bias that stays as it is
    # would be added twice.
    refused.update(
        {node.name or "": "its bias is shared, broadcast or scaled by beta" for node in pending if _weight(node) is not None and _fixed_bias(node)}
    )
    pending = [node for node in pending if _weight(node) is not None and not _fixed_bias(node)]
    done: list[str] = []
    with ModelRunner(teacher, threads=threads, extra_outputs=[node.outputs[0].name or "" for node in pending]) as runner:
        while pending:
            level = independent_prefix(pending)
            pending = pending[len(level) :]
            wanted = [node.outputs[0].name or "" for node in level]
            taught = (runner.run(runner.own(feeds), wanted) for feeds in samples.calibration())
            grams = output_grams(model, taught, level, samples.calibration(), threads)
            for node in level:
                if not finite(*(part for half in grams[node] for part in half)):
                    refused[node.name or ""] = NONFINITE_INPUTS  # a fit would write NaN weights
                elif _refit(node, grams[node]):
                    done.append(node.name or "")
                else:
                    refused[node.name or ""] = "a refit did not beat the factors on held-back calibration samples"
    return done, refused


def _refit(node: ir.Node, halves: list[Grams]) -> bool:
    weight, bias = _weight(node), _bias(node)
    assert weight is not None
    current = _as_rows(node, weight.const_value.numpy())  # type: ignore[union-attr]
    if bias is not None:
        current = np.vstack([current, bias.const_value.numpy()[None, :]])  # type: ignore[union-attr]
    size = current.shape[0]
    solution = checked_fit(halves, current, lambda own, cross: ridge_solve(own[:size, :size], cross[:size]))
    if solution is None:
        return False
    rows = solution[:-1] if bias is not None else solution
    array = weight.const_value.numpy()  # type: ignore[union-attr]
    weight.const_value = ir.Tensor(np.ascontiguousarray(_from_rows(node, rows, array.shape).astype(array.dtype)), name=weight.name)
    if bias is not None:
        bias.const_value = ir.Tensor(np.ascontiguousarray(solution[-1].astype(bias.const_value.numpy().dtype)), name=bias.name)  # type: ignore[union-attr]
    return True


def _weight(node: ir.Node) -> ir.Value | None:
    """The constant weight of a MatMul, a plain Gemm or a 1x1 stride-1 unpadded Conv; None for anything else."""
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    if weight is None or weight.const_value is None or any(user is not node for user, _ in weight.uses()):
        return None
    shape = weight.const_value.shape.numpy()
    if node.op_type == "MatMul" and len(shape) == 2:
        return weight
    if node.op_type == "Gemm" and not any(node.attributes.get_int(a, 0) for a in ("transA", "transB")) and node.attributes.get_float("alpha", 1.0) == 1.0:
        return weight
    plain = all(v == 1 for v in node.attributes.get_ints("strides", [1, 1])) and not any(node.attributes.get_ints("pads", [0, 0, 0, 0]))
    if node.op_type == "Conv" and len(shape) == 4 and tuple(shape[2:]) == (1, 1) and plain and node.attributes.get_int("group", 1) == 1:
        return weight
    return None


def _bias(node: ir.Node) -> ir.Value | None:
    """A private constant [n] bias added as is (Gemm beta 1), else None.

    A broadcast bias ([1] for n > 1 outputs) is not refit: one value cannot
    take n fitted ones.
    """
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    weight = node.inputs[1]
    if bias is None or bias.const_value is None or weight is None or weight.const_value is None:
        return None
    outputs = _as_rows(node, weight.const_value.numpy()).shape[1]
    if bias.const_value.shape.numpy() != (outputs,) or any(user is not node for user, _ in bias.uses()):
        return None
    return None if node.op_type == "Gemm" and node.attributes.get_float("beta", 1.0) != 1.0 else bias


def _fixed_bias(node: ir.Node) -> bool:
    """The node adds a bias that :func:`_bias` cannot refit."""
    return len(node.inputs) > 2 and node.inputs[2] is not None and _bias(node) is None


def _as_rows(node: ir.Node, weight: np.ndarray) -> np.ndarray:
    """The weight as [inputs, outputs]."""
    return weight.reshape(weight.shape[0], weight.shape[1]).T if node.op_type == "Conv" else weight


def _from_rows(node: ir.Node, rows: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return rows.T.reshape(shape) if node.op_type == "Conv" else rows.reshape(shape)
