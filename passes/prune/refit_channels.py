"""Reconstruction after channel pruning: refit the layers downstream of the cuts, in graph order.

Each layer is refit by ridge regression (:func:`passes.prune.reconstruct.tuned_strength`,
:func:`~passes.prune.reconstruct.fit_toward`) on the inputs the pruned
model really computes (layers before it already refit) against the
original model's output of the same layer (the teacher), shrunk toward the
pruned weight, its strength chosen on held-out samples.

Three findings on the model_zoo resnet50 (random weights, 8 calibration
samples, ratio 0.3) shape it; there reconstruction had made the output's
relative L2 worse, 0.74 -> 0.84:

- **Which layers.** Refitting only the chains' consumers left every layer
  that reads a residual stream (a bottleneck's first conv, a projection
  shortcut, the classifier) fed with the error of all pruned blocks before
  it. Every Conv (group 1), Gemm or MatMul whose input changed is refit
  (:func:`layers_to_refit`); the classifier alone took the logits' error
  from 0.57 to about 0.25, since most of it is the same on every input.
- **Honest hold-out.** The layer-wise check fitted on even samples and
  judged on odd ones, then refit on all of them at once; later layers were
  then judged on inputs that earlier refits had been fitted to, and looked
  better than they were (logits 0.10 on the calibration samples, 1.03 on
  others). Every decision is now made with fits on the even samples only.
- **Model-level check.** A layer-wise gain does not guarantee a better
  output: the 7x7 stage's refits (196 rows per half for up to 3169
  inputs) matched their teacher tensors on held-out samples and still made
  the logits diverge on some inputs. A level of refits is kept only if it
  lowers the model's output error on the held-out samples.

One on the trained digits CNN (bench/methods.py: 64 images, 32 a half)
adds a last step: fits on half the samples cost accuracy where a layer has
more inputs than rows (the classifier: 257 inputs), top-1 0.9865 -> 0.9730.
Once every decision is made, the kept layers are refit on all samples at
their chosen strengths, level by level (:func:`_refit_on_all`).
"""

from __future__ import annotations

__all__ = ["layers_to_refit", "refit_in_order"]

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphopt.progress import report
from graphopt.runtime import ModelRunner, stream_tensors
from passes.prune.channels import Chain, bias_value, input_axis, vector_bias
from passes.prune.layer_checks import NONFINITE_INPUTS, finite, layer_label
from passes.prune.reconstruct import (
    cross_grams,
    fit_toward,
    gram_refusal,
    independent_prefix,
    tuned_strength,
)
from passes.qdq.samples import Samples

logger = logging.getLogger(__name__)

_ONNX_DOMAINS = ("", "ai.onnx")
_FLOAT = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE)
Feeds = dict[str, np.ndarray]


def layers_to_refit(model: ir.Model, cut: list[Chain], skip: frozenset[str]) -> tuple[list[ir.Node], dict[str, str]]:
    """The chains' consumers and every other layer whose data input the pruning changed, that can be refit, in graph order.

    Also returns ``{consumer: why not}`` for consumers whose refit is not
    built (a grouped conv, a Gemm with alpha or beta other than 1, ...: see
    :func:`_refits_outputs`). Layers named (or whose op type is named) in
    ``skip`` are left as they are.
    """
    consumers = {user for chain in cut for user in chain.consumers}
    changed = {node for chain in cut for node in (chain.producer, *(n for n, _ in chain.channelwise))} | consumers
    tainted: set[ir.Value] = set()
    layers, refused = [], {}
    for node in model.graph:
        reads_changed = bool(node.inputs) and node.inputs[0] in tainted
        if node in consumers and not _refits_outputs(node):
            refused[layer_label(node)] = f"reconstruction of this {node.op_type} is not built (grouped, or scaled by alpha/beta)"
        elif node in consumers or (reads_changed and _refits_outputs(node) and node.name not in skip and node.op_type not in skip):
            layers.append(node)
        if node in changed or any(value in tainted for value in node.inputs if value is not None):
            tainted.update(node.outputs)
    return layers, refused


def refit_in_order(
    model: ir.Model, teacher: ir.Model, layers: list[ir.Node], out_keep: dict[ir.Node, np.ndarray], samples: Samples, threads: int | None
) -> tuple[list[str], dict[str, str]]:
    """Refits ``layers`` of ``model`` to their twins in ``teacher``; returns (refit layers, {layer: why not}).

    Layers that do not feed one another are refit together from one run of
    the pruned model (a level); the teacher session is opened once.
    ``out_keep`` holds the kept output channels of pruned layers (only those
    are fitted). Decisions use the even samples to fit and the odd ones to
    judge each fit's strength and each level's effect on the model's
    outputs; the layers kept are then refit on all samples (:func:`_refit_on_all`).
    """
    position = {node: index for index, node in enumerate(model.graph)}
    twin = dict(zip(model.graph, teacher.graph))  # pruning adds and removes no nodes
    costly = {node: reason for node in layers if (reason := _too_costly(node, twin[node]))}
    refused = {layer_label(node): reason for node, reason in costly.items()}
    pending = sorted(set(layers) - set(costly), key=position.__getitem__)
    outputs = [value.name or "" for value in model.graph.outputs]
    kept_levels: list[dict[ir.Node, tuple[float, Fit]]] = []
    with ModelRunner(teacher, threads=threads, extra_outputs=[node.inputs[0].name or "" for node in pending]) as runner:

        def teach(feeds: Iterable[Feeds], wanted: list[str]) -> Iterator[Feeds]:
            return (runner.run(runner.own(sample), wanted) for sample in feeds)

        held = [feeds for index, feeds in enumerate(samples.calibration()) if index % 2]
        goal = list(teach(held, outputs))
        error = output_error(model, held, goal, threads)
        total = len(pending)
        while pending:
            report(total - len(pending), total, "layers refit")
            level = independent_prefix(pending)
            pending = pending[len(level) :]
            taught = teach(samples.calibration(), [node.inputs[0].name or "" for node in level])
            grams = cross_grams(model, taught, level, samples.calibration(), threads)
            saved = [(value, value.const_value) for node in level for value in (node.inputs[1], bias_value(node)) if value is not None]
            fits = {node: _fit_problem(node, twin[node], out_keep.get(node)) for node in level}
            unusable = {node for node in level if not finite(*(part for half in grams[node] for part in half))}
            refused.update({layer_label(node): NONFINITE_INPUTS for node in unusable})
            strengths = {node: tuned_strength(grams[node], fits[node].plain, fits[node].target) for node in level if node not in unusable}
            refit = {node: (relative, fits[node]) for node, relative in strengths.items() if relative is not None}
            for node, (relative, fit) in refit.items():
                _write(node, fit, fit_toward(grams[node][:1], fit.plain, fit.target, relative))
            refused.update({layer_label(node): "a refit did not beat plain pruning on held-out calibration samples" for node in strengths if node not in refit})
            after = output_error(model, held, goal, threads) if refit and held else error
            if held and refit and not after < error:  # "not <": a NaN output error reverts too
                for value, tensor in saved:
                    value.const_value = tensor
                logger.debug("refits of %s reverted: output error %.4g -> %.4g", [layer_label(n) for n in refit], error, after)
                refused.update({layer_label(node): "the refit did not lower the model's output error on held-out calibration samples" for node in refit})
                continue
            error = after
            if refit:
                kept_levels.append(refit)
        if held:
            _refit_on_all(model, kept_levels, teach, samples, threads)
    return [layer_label(node) for level in kept_levels for node in level], refused


def _too_costly(node: ir.Node, original: ir.Node) -> str | None:
    """Why ``node`` is not refit, decided before its grams are built: they would not fit the memory budget."""
    return gram_refusal(_inputs(node), _inputs(original))


def _inputs(node: ir.Node) -> int:
    """Width of ``node``'s grams: its input features (C*kh*kw for Conv) plus the ones column."""
    shape = [int(dim) for dim in node.inputs[1].const_value.shape.numpy()]  # type: ignore[union-attr]
    if node.op_type == "Conv":
        return int(np.prod(shape[1:])) + 1
    return (shape[1] if node.attributes.get_int("transB", 0) else shape[0]) + 1


def _refit_on_all(
    model: ir.Model,
    levels: list[dict[ir.Node, tuple[float, Fit]]],
    teach: Callable[[Iterable[Feeds], list[str]], Iterator[Feeds]],
    samples: Samples,
    threads: int | None,
) -> None:
    """Refits each kept layer on all samples at the strength chosen for it, level by level in graph order.

    The choices were made honestly (fits on the even samples judged on the
    odd ones); with them made, the final fit may use every sample, as after
    cross-validation. Nothing is left to check it on. On the digits CNN the
    classifier Gemm (257 inputs) fitted on 32 images took top-1 from 0.9899
    (the conv's refit alone) to 0.9730; fitted on all 64, 0.9865. Levels are
    redone in order, so each layer is fitted on the inputs that the final
    fits before it produce.
    """
    for level in levels:
        nodes = list(level)
        grams = cross_grams(model, teach(samples.calibration(), [node.inputs[0].name or "" for node in nodes]), nodes, samples.calibration(), threads)
        for node, (relative, fit) in level.items():
            _write(node, fit, fit_toward(grams[node], fit.plain, fit.target, relative))


def output_error(model: ir.Model, feeds: list[Feeds], goal: list[Feeds], threads: int | None) -> float:
    """Relative L2 error of ``model``'s outputs on ``feeds`` against ``goal`` (the teacher's), all samples together."""
    outputs = [value.name or "" for value in model.graph.outputs]
    squared = total = 0.0
    for got, want in zip(stream_tensors(model, outputs, feeds, threads=threads), goal):
        for name in outputs:
            reference = np.asarray(want[name], np.float64)
            squared += float(np.sum((np.asarray(got[name], np.float64) - reference) ** 2))
            total += float(np.sum(reference**2))
    return float(np.sqrt(squared / total)) if total > 0 else float(np.sqrt(squared))


@dataclass(frozen=True)
class Fit:
    """One layer's refit problem in [K, N] layout, with a bias row when the layer has a bias.

    ``plain`` is the pruned weight (the fit is shrunk toward it), ``target``
    the original layer's weight over the original inputs (the teacher).
    """

    plain: np.ndarray
    target: np.ndarray
    dtype: np.dtype
    bias_dtype: np.dtype | None


def _fit_problem(node: ir.Node, original: ir.Node, kept_outputs: np.ndarray | None) -> Fit:
    """The refit of ``node``'s weight (and bias) to its ``original`` twin's outputs."""
    weight = original.inputs[1].const_value.numpy()  # type: ignore[union-attr]
    bias = _vector_bias(original)
    target = _as_kn(original, weight)
    if kept_outputs is not None:  # the node is itself pruned: fit only its kept outputs
        target, bias = target[:, kept_outputs], None if bias is None else bias[kept_outputs]
    current = node.inputs[1].const_value.numpy()  # type: ignore[union-attr]
    plain = _with_bias_row(_as_kn(node, current), None if bias is None else _vector_bias(node))
    return Fit(plain, _with_bias_row(target, bias), current.dtype, None if bias is None else bias.dtype)


def _write(node: ir.Node, fit: Fit, solution: np.ndarray) -> None:
    """Writes a [K(+1), N] solution of ``fit`` back as ``node``'s weight (and bias)."""
    current_shape = node.inputs[1].const_value.shape.numpy()  # type: ignore[union-attr]
    new_kn = (solution[:-1] if fit.bias_dtype is not None else solution).astype(fit.dtype)
    new_weight = _from_kn(node, new_kn, tuple(int(d) for d in current_shape), int(current_shape[input_axis(node)]))
    node.inputs[1].const_value = ir.Tensor(np.ascontiguousarray(new_weight), name=node.inputs[1].name)
    bias = bias_value(node)
    if fit.bias_dtype is not None and bias is not None:
        bias.const_value = ir.Tensor(np.ascontiguousarray(solution[-1].astype(fit.bias_dtype)), name=bias.name)


def _refits_outputs(node: ir.Node) -> bool:
    """Whether ``node`` can be refit to its teacher's outputs: a 2-D Conv (group 1), a Gemm (no transA, alpha 1), or a MatMul by a 2-D weight.

    Its weight is a private float initializer and its bias, if any, a private
    constant (a Gemm's with beta 1; a MatMul's is the constant of the Add
    after it, see :func:`passes.prune.channels.bias_value`), as the refit solves for both.
    """
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    if node.domain not in _ONNX_DOMAINS or weight is None or weight.const_value is None or weight.is_graph_input():
        return False
    if weight.const_value.dtype not in _FLOAT or any(user is not node for user, _ in weight.uses()):
        return False
    bias = bias_value(node)
    if bias is not None and (bias.const_value is None or bias.is_graph_input() or len({user for user, _ in bias.uses()}) != 1):
        return False
    if node.op_type == "Conv":
        flat_bias = bias is None or len(bias.const_value.shape) == 1  # type: ignore[union-attr]
        return len(weight.const_value.shape) == 4 and node.attributes.get_int("group", 1) == 1 and flat_bias
    if node.op_type == "Gemm":
        plain = not node.attributes.get_int("transA", 0) and node.attributes.get_float("alpha", 1.0) == 1.0
        return plain and (bias is None or node.attributes.get_float("beta", 1.0) == 1.0)
    if node.op_type == "MatMul":
        return len(weight.const_value.shape) == 2 and node.inputs[0] is not None and node.inputs[0].const_value is None
    return False


def _vector_bias(node: ir.Node) -> np.ndarray | None:
    """The node's constant [N] bias, or None (absent, or a broadcast one that stays as it is)."""
    value = vector_bias(node)
    return None if value is None else value.const_value.numpy()  # type: ignore[union-attr]


def _with_bias_row(weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    return np.asarray(weight, np.float64) if bias is None else np.vstack([np.asarray(weight, np.float64), np.asarray(bias, np.float64)[None, :]])


def _as_kn(node: ir.Node, weight: np.ndarray) -> np.ndarray:
    """The weight as [K, N]: K input features (C-major patches for Conv, like conv_patches), N outputs."""
    if node.op_type == "Conv":
        return weight.reshape(weight.shape[0], -1).T
    return weight.T if node.attributes.get_int("transB", 0) else weight


def _from_kn(node: ir.Node, kn: np.ndarray, shape: tuple[int, ...], kept: int) -> np.ndarray:
    """Back from [K_kept, N] to the node's weight layout (``shape``) with ``kept`` input channels."""
    if node.op_type == "Conv":
        out, _, kh, kw = shape
        return kn.T.reshape(out, kept, kh, kw)
    return kn.T if node.attributes.get_int("transB", 0) else kn
