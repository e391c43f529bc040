"""graphopt's weight-only ``qdq`` (int4 blocks, int8 per column) against onnxruntime's MatMulNBitsQuantizer.

Run from the repository root (``make bench-weight-only``)::

    .venv/bin/python bench/weight_only.py [--models relu_mlp,relu_mlp_b64,mlp,encoder,minilm] [--markdown]

Models (built here or by model_zoo, no downloads; all but minilm have random weights):

- ``relu_mlp``: three PyTorch-style Linear layers (Gemm, transB=1, bias)
  1024 wide with Relu between them, batch 1: a decoding-like workload where
  weight bytes dominate and int4 should pay;
- ``relu_mlp_b64``: the same at batch 64, where the int4 kernel may lose;
- ``mlp``: model_zoo's tiny 64-128-10 Gemm/Relu MLP, batch 2;
- ``encoder``: model_zoo's MiniLM-L6-H384 encoder (random weights), batch 1,
  sequence 128;
- ``minilm``: the real pretrained all-MiniLM-L6-v2 (``model_zoo.minilm``,
  the zoo extra; without it the script says so in one line and goes on),
  fed real sentences in batches of 8 padded to their longest: 16 batches of
  ``model_zoo/data/calibration_sentences.txt`` calibrate, 8 batches of the
  held-out part of ``sentences.txt`` evaluate.

Variants, each from the same float model, blocks of 32 along K:

- graphopt int4: ``QuantizePass(weight_bits=4, data=4 feeds at the
  evaluation shapes)`` with its defaults (speed guard on: the model stays
  float if int4 is slower; it times the model on those feeds);
- graphopt int8: the same with ``weight_only=True`` (8 bits, a scale per
  output column);
- graphopt int4 unchecked: int4 with ``check_speed=false``, i.e. the form
  the pass writes, kept whatever its speed;
- graphopt int8 unchecked: int8 weight-only with ``check_speed=false``;
- graphopt int4 gptq / int8 gptq: the unchecked rows with
  ``rounding=gptq`` (weights rounded so that each layer's outputs on the
  calibration feeds move least), to compare with the unchecked rows;
- ort-nbits: ``onnxruntime.quantization.matmul_nbits_quantizer.
  MatMulNBitsQuantizer(bits=4, block_size=32, is_symmetric=True)`` in its
  default QOperator format (MatMulNBits nodes written directly).

Measured: size (float file bytes / quantized file bytes), speed-up (float
median / quantized median, onnxruntime CPU, 1 thread, default optimization,
interleaved rounds after a warm-up, bench/timing.py), cosine and relative L2
against float on 8 evaluation feeds (synthesized, seed 1, but for minilm),
and which ops onnxruntime ends up running for the MatMuls.

Goal (the issue's "never slower than the float model"): graphopt's int4
and int8 rows have a speed-up >= 1.0, or the pass kept the model float
(then it computes the float graph: its weights as they were, or, by
default, stored as int8 and widened by onnxruntime once at load, whose
speed-up is printed beside "kept float" and is 1.0 within timing noise). This is a benchmark: it exits 0 whatever the outcome, and 2
on bad arguments.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from cli_args import OneLineParser  # bench/ is on sys.path when run as a script
from tables import table
from timing import fidelity, latencies, session

_REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODELS = ("relu_mlp", "relu_mlp_b64", "mlp", "encoder", "minilm")
BLOCK = 32
CHECKED = ("graphopt int4", "graphopt int8")  # the rows with the speed guard on
_HEADERS = ("variant", "size x", "speed-up @1 thr", "cosine", "rel L2", "MatMul ops onnxruntime runs", "pass s")


def relu_mlp(batch: int, width: int = 1024, layers: int = 3) -> Any:
    """x -> (Gemm(transB=1, bias) -> Relu) x layers, as torch.onnx exports nn.Linear stacks."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, weights, x = [], [], "x"
    for i in range(layers):
        weights += [
            numpy_helper.from_array((rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32), f"w{i}"),
            numpy_helper.from_array((rng.standard_normal(width) * 0.1).astype(np.float32), f"b{i}"),
        ]
        nodes += [helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [f"z{i}"], transB=1), helper.make_node("Relu", [f"z{i}"], [f"h{i}"])]
        x = f"h{i}"
    graph = helper.make_graph(
        nodes, "relu_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, width])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [batch, width])], weights,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def float_model(name: str) -> tuple[Any, dict[str, tuple[int, ...]]]:
    """The float ModelProto and the shapes its synthesized feeds take."""
    import model_zoo

    if name.startswith("relu_mlp"):
        batch = 64 if name.endswith("_b64") else 1
        return relu_mlp(batch), {"x": (batch, 1024)}
    if name == "encoder":
        from model_zoo.encoder import build_encoder

        zoo = build_encoder()
    elif name == "minilm":
        from model_zoo import minilm

        return minilm.minilm().model, {}
    else:
        zoo = model_zoo.build(name)
    return zoo.model, {key: value.shape for key, value in zoo.feeds.items()}


def minilm_feeds() -> tuple[list[dict], list[dict]]:
    """(calibration, evaluation) feeds of real sentences for the real MiniLM, batches of 8 padded to their longest."""
    from model_zoo import minilm

    calibration = minilm.load_sentences(minilm.CALIBRATION_SENTENCES)[:128]
    evaluation = minilm.load_sentences()[160:224]  # the part bench/lowrank.py evaluates on too
    return minilm.tokenize_batches(calibration, 8), minilm.tokenize_batches(evaluation, 8)


def _graphopt(
    source: Path, out: Path, data: list[dict], bits: int, check_speed: bool = True, rounding: str = "nearest"
) -> tuple[str, float]:
    import graphopt
    from passes.qdq import QuantizePass

    start = time.perf_counter()
    model = graphopt.load(source)
    pass_ = QuantizePass(
        weight_bits=bits, weight_only=True, block_size=BLOCK, data=data, check_speed=check_speed, rounding=rounding, threads=1
    )
    graphopt.run_pipeline(model, [pass_])
    graphopt.save(model, out)
    return pass_.summary.line(), time.perf_counter() - start


def _ort_nbits(source: Path, out: Path) -> tuple[str, float]:
    import logging

    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)  # a line per skipped node
    start = time.perf_counter()
    quantizer = MatMulNBitsQuantizer(onnx.load(str(source)), bits=4, block_size=BLOCK, is_symmetric=True)
    quantizer.process()
    quantizer.model.save_model_to_file(str(out), use_external_data_format=False)
    return "", time.perf_counter() - start


def _runtime_matmul_ops(path: Path, folder: Path) -> str:
    """The MatMul-like ops onnxruntime runs after its default optimizations, with counts."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level, options.intra_op_num_threads = 3, 1
    options.optimized_model_filepath = str(folder / f"{path.stem}.runtime.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    kinds = ("MatMul", "Gemm", "FusedGemm", "MatMulNBits", "FusedMatMul", "DequantizeLinear")
    ops = Counter(node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node if node.op_type in kinds)
    return ", ".join(f"{count} {op}" for op, count in sorted(ops.items())) or "none"


def run_model(name: str, folder: Path) -> tuple[list[tuple[str, ...]], dict[str, Any]]:
    import onnx
    import onnx_ir as ir

    from graphopt.data import synthesize_feeds

    proto, shapes = float_model(name)
    source = folder / f"{name}.onnx"
    onnx.save(proto, source)
    if name == "minilm":
        data, feeds = minilm_feeds()
    else:
        feeds = list(synthesize_feeds(ir.serde.deserialize_model(proto), count=8, seed=1, shapes=shapes))
        # The pass times the model on these: at the shapes it will run at (its own default for a
        # dynamic dim such as the encoder's sequence is 16 tokens, not 128).
        data = list(synthesize_feeds(ir.serde.deserialize_model(proto), count=4, seed=0, shapes=shapes))
    variants = {
        "graphopt int4": lambda out: _graphopt(source, out, data, 4),
        "graphopt int8": lambda out: _graphopt(source, out, data, 8),
        "graphopt int4 unchecked": lambda out: _graphopt(source, out, data, 4, check_speed=False),
        "graphopt int8 unchecked": lambda out: _graphopt(source, out, data, 8, check_speed=False),
        "graphopt int4 gptq": lambda out: _graphopt(source, out, data, 4, check_speed=False, rounding="gptq"),
        "graphopt int8 gptq": lambda out: _graphopt(source, out, data, 8, check_speed=False, rounding="gptq"),
        "ort-nbits": lambda out: _ort_nbits(source, out),
    }
    paths, notes, seconds = {"float": source}, {}, {}
    for label, make in variants.items():
        out = folder / f"{name}.{label.replace(' ', '_')}.onnx"
        try:
            notes[label], seconds[label] = make(out)
            paths[label] = out
        except Exception as exc:  # a tool that fails is one row, not a failed benchmark
            notes[label] = f"failed: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"
    sessions = {label: session(ir.load(path)) for label, path in paths.items()}
    labels = list(sessions)
    medians = dict(zip(labels, latencies([sessions[label] for label in labels], feeds[0])))
    rows, facts = [], {"notes": notes, "float_ms": medians["float"] * 1e3}
    for label in ["float", *variants]:
        if label not in paths:
            rows.append((label, notes[label], "", "", "", "", ""))
            continue
        rel, cosine = fidelity(sessions["float"], sessions[label], feeds)
        size = source.stat().st_size / paths[label].stat().st_size
        speed = medians["float"] / medians[label]
        facts[label] = {"speed": speed, "size": size, "cosine": cosine, "rel": rel}
        rows.append((
            label, f"{size:.2f}x", f"{speed:.2f}x" if label != "float" else f"{medians[label] * 1e3:.3f} ms",
            f"{cosine:.5f}", f"{rel:.4f}", _runtime_matmul_ops(paths[label], folder),
            f"{seconds[label]:.1f}" if label in seconds else "",
        ))
    return rows, facts


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated: " + ", ".join(DEFAULT_MODELS))
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    sys.path.insert(0, str(_REPO_ROOT))
    import model_zoo

    unknown = [n for n in names if n not in DEFAULT_MODELS and n not in model_zoo.names()]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; valid: {', '.join(DEFAULT_MODELS)} or a zoo name")
    started, verdicts, rounding = time.perf_counter(), [], []
    bullet = "- " if args.markdown else ""
    with tempfile.TemporaryDirectory(prefix="graphopt-weight-only-") as folder:
        for name in names:
            print(f"{name}...", file=sys.stderr, flush=True)
            try:
                rows, facts = run_model(name, Path(folder))
            except ImportError as exc:  # minilm without torch / sentence-transformers (the zoo extra)
                print(f"{bullet}{name}: skipped, {exc}\n")
                continue
            print(f"### {name} (float {facts['float_ms']:.3f} ms)\n" if args.markdown else f"{name} (float {facts['float_ms']:.3f} ms)")
            print(table(_HEADERS, rows, args.markdown) + "\n")
            for label in CHECKED:
                note = facts["notes"].get(label, "")
                print(f"{bullet}{label}: {note}")
                kept_float = "stays float" in note
                if label in facts:
                    speed = facts[label]["speed"]
                    shown = "kept float" if kept_float else f"{speed:.2f}x"
                    if kept_float and "stored as int8" in note:
                        shown = f"kept float with int8 storage ({speed:.2f}x)"
                    verdicts.append((f"{name} {label.split()[-1]} {shown}", kept_float or speed >= 1.0))
                else:
                    verdicts.append((f"{name} {label.split()[-1]} failed", False))
            for bits in ("int4", "int8"):
                nearest, gptq = facts.get(f"graphopt {bits} unchecked"), facts.get(f"graphopt {bits} gptq")
                if nearest and gptq:
                    print(f"{bullet}graphopt {bits} gptq: {facts['notes'].get(f'graphopt {bits} gptq', '')}")
                    rounding.append(f"{name} {bits} {nearest['rel']:.4f} -> {gptq['rel']:.4f}")
            print()
    verdict = "PASS" if all(ok for _, ok in verdicts) else "FAIL"
    print(f"{bullet}{verdict} graphopt weight-only never slower than float (speed-up >= 1.0, or kept float): {', '.join(label for label, _ in verdicts)}")
    print(f"{bullet}(info) rel L2, unchecked nearest -> gptq rounding: {', '.join(rounding) or 'none run'}")
    print(f"{bullet}latency: 1 thread, onnxruntime default optimization, medians of interleaved rounds")
    print(f"{bullet}total benchmark time {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
