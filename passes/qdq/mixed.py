"""Mixed precision and the speed guard of the ``qdq`` pass.

``choose`` starts from the fully quantized model. With a fidelity target it
ranks the quantized layers by sensitivity, the error each adds on top of the
error it receives, measured once on a held-back sample with every layer's
input and output exposed, and returns the most sensitive ones to float,
finding the fewest that meet the target by bisection (one model build and
one onnxruntime session per probe). A target is met when the held-back
figure less two standard errors of its per-sample values reaches it
(passes/held_back.py): the fewest float layers that meet it are selected
to sit just above it, and unseen samples land lower. Then it times the result against the
float model (interleaved medians) and, if int8 is slower, keeps the model
float: the result must never be slower than what the user had.

Layers returned to float for speed (one by one, or the whole model) keep
int8 storage when ``store_slow`` is on (storage.py): float kernels, weights
about 4x smaller, and a fidelity target, if any, still checked.
"""

from __future__ import annotations

__all__ = ["choose", "sensitivity"]

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from graphopt.data import Feeds
from graphopt.ledger import IN_SUMMARY
from graphopt.progress import report
from graphopt.runtime import ModelRunner, measure_latency
from passes.held_back import Judgement, judge, meets
from passes.qdq import storage

logger = logging.getLogger(__name__)

# Builds the quantized model with the named layers kept float; returns it and its summary.
Build = Callable[[Iterable[str]], tuple[ir.Model, Any]]
# Latency ratio (int8 / float) above which the model stays float.
SLOWER_THAN_FLOAT = 1.0
# Per layer, kernel timings wobble by a few percent: only a clear loss counts.
LAYER_SLOWER_THAN_FLOAT = 1.1
# The speed check spends about this long timing, within these round counts.
SPEED_CHECK_SECONDS = 1.0
MIN_SPEED_ROUNDS, MAX_SPEED_ROUNDS = 20, 2000


def choose(
    float_model: ir.Model,
    build: Build,
    layers: Sequence[str],
    held_back: Sequence[Feeds],
    *,
    target_cosine: float | None,
    target_snr: float | None,
    check_speed: bool,
    threads: int | None,
    kind: str = "int8",
    speed_reference: ir.Model | None = None,
    store_slow: bool = False,
):
    """The quantized model to keep and its summary (see module docstring).

    ``kind`` names the quantization in reasons; the whole model's latency is
    compared with ``speed_reference`` (the user's model, before any
    preparation) when given, else with ``float_model``. A model that backs
    off entirely is ``speed_reference`` again (with int8 storage if
    ``store_slow``), since the caller hands that back.
    """
    reference = float_model.clone()
    timed = speed_reference if speed_reference is not None else reference
    with ModelRunner(reference, threads=threads) as runner:
        expected = [runner.run(feeds) for feeds in held_back]
    # Sessions are opened once and reused: the float model's for every latency comparison,
    # and the quantized model's from its judgement to its timing. On big graphs opening is
    # the cost (a 20k-node chain: ~2.5 s float, twice that quantized).
    with _Sessions(timed, threads) as sessions:
        model, summary = build([])
        judgement = _judge(sessions, model, held_back, expected)
        if not meets(judgement, target_cosine, target_snr):
            ranking = sensitivity(reference, model, held_back[0], threads)
            model, summary, judgement, kept_float = _fewest_float_layers(
                build, ranking, held_back, expected, sessions, target_cosine, target_snr
            )
            reason = f"sensitive: kept float to reach {_target_text(target_cosine, target_snr)}"
            summary.float_layers.update({name: reason for name in kept_float})
        summary.fidelity = _fidelity(judgement)
        if check_speed and summary.quantized:
            ratio = _latency_ratio(sessions, model, held_back[0])
            slow = slower_layers(reference, model, summary.quantized, held_back[0], threads)
            if slow:
                # A float layer amid int8 ones adds conversions around it, so the
                # variant is kept only if the whole model is faster with it.
                kept = {name: why for name, why in summary.float_layers.items() if why.startswith("sensitive")}
                variant, variant_summary = build([*kept, *slow])
                variant_ratio = _latency_ratio(sessions, variant, held_back[0])
                logger.info("qdq: %d layers slower in %s; whole model %.2fx -> %.2fx float", len(slow), kind, ratio, variant_ratio)
                if variant_ratio < ratio:
                    model, summary, ratio = variant, variant_summary, variant_ratio
                    summary.float_layers.update(kept)
                    summary.float_layers.update({name: f"{kind} kernel slower than float ({text})" for name, text in slow.items()})
                    if store_slow:  # measures the stored model's fidelity when it keeps the storage
                        model = _with_int8_storage(model, slow, summary, held_back, expected, sessions, target_cosine, target_snr)
                    if not summary.stored:
                        summary.fidelity = _fidelity(_judge(sessions, model, held_back, expected))
            summary.latency_ratio = ratio
            if ratio > SLOWER_THAN_FLOAT or not summary.quantized:
                # Nothing quantized left (every layer slower) is float too: the model as given, not the prepared one.
                why = f"took {ratio:.2f}x the float latency on onnxruntime CPU" if summary.quantized else "kernels were all slower than float"
                summary.backed_off = f"{kind} {why}; the model stays float"
                logger.warning("qdq: %s", summary.backed_off, extra=IN_SUMMARY)
                layers = [*summary.quantized, *summary.stored]
                for name in summary.quantized:
                    summary.float_layers[name] = f"{kind} model slower than float"
                summary.quantized, summary.stored, summary.weight_bytes_before, summary.weight_bytes_after = [], [], 0, 0
                return _backed_off(timed, sessions, layers, summary, held_back, expected, target_cosine, target_snr, store_slow)
        return model, summary


def _backed_off(
    timed: ir.Model,
    sessions: _Sessions,
    layers: list[str],
    summary: Any,
    held_back,
    expected,
    target_cosine,
    target_snr,
    store_slow: bool,
) -> tuple[ir.Model, Any]:
    """The model as given, with int8 storage of ``layers`` if ``store_slow`` and it costs no speed."""
    model = timed.clone()
    if not store_slow:
        return model, summary
    stored = _with_int8_storage(model, layers, summary, held_back, expected, sessions, target_cosine, target_snr)
    if not summary.stored:
        return model, summary
    # onnxruntime folds the widening at load, so this should read about 1.0; a
    # clear loss means it did not (an onnxruntime change), and storage goes.
    ratio = _latency_ratio(sessions, stored, held_back[0])
    if ratio > LAYER_SLOWER_THAN_FLOAT:
        logger.warning("qdq: int8 storage ran %.2fx the float latency; the weights stay float", ratio)
        summary.stored, summary.weight_bytes_before, summary.weight_bytes_after = [], 0, 0
        return model, summary
    summary.latency_ratio = ratio
    return stored, summary


def _with_int8_storage(
    model: ir.Model, layers: Iterable[str], summary: Any, held_back, expected, sessions: _Sessions, target_cosine, target_snr
) -> ir.Model:
    """``model`` with the float ``layers``' weights stored as int8 (storage.py) if the fidelity target still holds.

    Updates ``summary``: the stored layers, their weight bytes, and the
    fidelity measured on the stored model.
    """
    candidate = model.clone()
    stored = storage.store_int8(candidate, frozenset(layers))
    if not stored.layers:
        return model
    judgement = _judge(sessions, candidate, held_back, expected)
    if not meets(judgement, target_cosine, target_snr):
        logger.info("qdq: int8 storage of %d float layers misses the target (cosine %.5f); they stay float", len(stored.layers), judgement.cosine)
        return model
    summary.stored = stored.layers
    summary.weight_bytes_before += stored.bytes_before
    summary.weight_bytes_after += stored.bytes_after
    summary.fidelity = _fidelity(judgement)
    return candidate


def slower_layers(
    reference: ir.Model, quantized: ir.Model, layers: Sequence[str], feeds: Feeds, threads: int | None, runs: int = 10
) -> dict[str, str]:
    """Quantized layers whose int8 kernel took longer than their float kernel, with both times.

    Both models run under onnxruntime's profiler at the EXTENDED level: it
    makes the same int8 and Conv+activation fusions as the default level but
    not the NCHWc layout rewrite, which renames float Convs beyond recognition;
    a fused kernel keeps its node's name (plus ``_token_N`` for int8 ones).
    The whole-model check at the default level still has the last word.
    """
    float_us = _kernel_times(reference, feeds, threads, runs)
    int8_us = _kernel_times(quantized, feeds, threads, runs)
    return {
        name: f"{int8_us[name]:.0f} us vs {float_us[name]:.0f} us"
        for name in layers
        if name in float_us and name in int8_us and int8_us[name] > float_us[name] * LAYER_SLOWER_THAN_FLOAT
    }


def _kernel_times(model: ir.Model, feeds: Feeds, threads: int | None, runs: int) -> dict[str, float]:
    """Median microseconds per run of each node's kernel, keyed by the original node name."""
    # A ModelRunner, not a session on the serialized model: it lends the weights, so models
    # whose weights live in an external data file open too.
    with tempfile.TemporaryDirectory(prefix="graphopt-qdq-profile-") as folder, ModelRunner(
        model, optimization="extended", threads=threads, profile_prefix=os.path.join(folder, "profile")
    ) as runner:
        own = runner.own(feeds)
        for _ in range(runs + 1):  # the first run (allocations) is dropped below
            runner.run(own)
        durations: dict[str, list[float]] = {}
        for event in _kernel_events(runner.end_profiling()):
            base = event["name"][: -len("_kernel_time")].split("_token_")[0]
            durations.setdefault(base, []).append(float(event.get("dur", 0)))
    return {name: float(np.median(times[1:] or times)) for name, times in durations.items()}


def _kernel_events(path: str) -> Iterator[dict[str, Any]]:
    """The node kernel events of an onnxruntime profile.

    onnxruntime writes the profile as a JSON array with one event per line,
    so it is read a line at a time: parsed whole, a 10k-node chain's 43 MB
    profile held about 220 MB of dicts. A profile laid out otherwise is
    parsed whole.
    """
    found = False
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if '_kernel_time"' not in line:
                continue
            try:
                event = json.loads(line.strip().rstrip(","))
            except json.JSONDecodeError:  # not one event on this line
                continue
            if isinstance(event, dict) and _is_kernel_event(event):
                found = True
                yield event
    if not found:
        with open(path, encoding="utf-8") as handle:
            yield from (event for event in json.load(handle) if isinstance(event, dict) and _is_kernel_event(event))


def _is_kernel_event(event: dict[str, Any]) -> bool:
    return event.get("cat") == "Node" and str(event.get("name", "")).endswith("_kernel_time")


def sensitivity(reference: ir.Model, quantized: ir.Model, feeds: Feeds, threads: int | None) -> list[str]:
    """Quantized layers, most sensitive first: output error minus input error, relative L2."""
    layers = []
    for node in quantized.graph:
        if node.op_type in ("Conv", "MatMul", "Gemm") and node.outputs[0].name:
            source = _float_input(node)
            layers.append((node.name or "", source, node.outputs[0].name))
    names = sorted({name for _, source, out in layers for name in (source, out) if name})
    in_reference, in_quantized = _node_outputs(reference), _node_outputs(quantized)
    ref_names = [n for n in names if n in in_reference]
    quant_names = [n for n in names if n in in_quantized]
    with ModelRunner(reference, threads=threads, extra_outputs=ref_names) as runner:
        ref_out = runner.run(runner.own(feeds))
    with ModelRunner(quantized, threads=threads, extra_outputs=quant_names) as runner:
        quant_out = runner.run(runner.own(feeds))
    scores = []
    for name, source, out in layers:
        added = _rel_l2(ref_out, quant_out, out) - (_rel_l2(ref_out, quant_out, source) if source else 0.0)
        scores.append((added, name))
    return [name for _, name in sorted(scores, reverse=True)]


def _fewest_float_layers(build: Build, ranking: list[str], held_back, expected, sessions: _Sessions, target_cosine, target_snr):
    """Bisects the number of top-ranked layers kept float; all float always meets any target."""
    low, high = 0, len(ranking)  # low fails, high meets (nothing quantized = the float model)
    best = None
    probes, tried = max(1, len(ranking)).bit_length(), 0
    while high - low > 1:
        report(tried, probes, "float layer counts tried")
        tried += 1
        middle = (low + high) // 2
        model, summary = build(ranking[:middle])
        judgement = _judge(sessions, model, held_back, expected)
        logger.info(
            "qdq: %d layers float -> cosine %.5f (bound %.5f), SNR %.1f dB (bound %.1f)",
            middle, judgement.cosine, judgement.lower_bound, judgement.snr_db, judgement.snr_lower_bound,
        )
        if meets(judgement, target_cosine, target_snr):
            high, best = middle, (model, summary, judgement)
        else:
            low = middle
    if best is None:  # only "everything float" met the target
        model, summary = build(ranking[:high])
        best = (model, summary, _judge(sessions, model, held_back, expected))
    return (*best, ranking[:high])


def _fidelity(judgement: Judgement) -> dict[str, float]:
    """The summary's record of a judgement: held-back cosine and SNR, and the bounds the targets were held to."""
    return {
        "cosine": judgement.cosine,
        "cosine_lower_bound": judgement.lower_bound,
        "snr_db": judgement.snr_db,
        "snr_db_lower_bound": judgement.snr_lower_bound,
    }


def _target_text(target_cosine: float | None, target_snr: float | None) -> str:
    parts = [f"cosine {target_cosine:g}" if target_cosine is not None else "", f"SNR {target_snr:g} dB" if target_snr is not None else ""]
    return " and ".join(p for p in parts if p)


class _Sessions:
    """onnxruntime sessions reused within one choose(): the float model's, and the last quantized model's.

    choose() times every candidate against the same float model, and times
    a quantized model right after judging it; each opening serializes and
    optimizes the whole graph again.
    """

    def __init__(self, float_model: ir.Model, threads: int | None) -> None:
        self.float_model, self.threads = float_model, threads
        self._float: ModelRunner | None = None
        self._last: tuple[ir.Model, ModelRunner] | None = None

    def float_runner(self) -> ModelRunner:
        if self._float is None:
            self._float = ModelRunner(self.float_model, threads=self.threads)
        return self._float

    def runner(self, model: ir.Model) -> ModelRunner:
        """A session on ``model``; the previous model's closes first, so at most one is held."""
        if self._last is not None and self._last[0] is model:
            return self._last[1]
        self._close_last()
        runner = ModelRunner(model, threads=self.threads)
        self._last = (model, runner)
        return runner

    def _close_last(self) -> None:
        if self._last is not None:
            self._last[1].close()
            self._last = None

    def __enter__(self) -> _Sessions:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._close_last()
        if self._float is not None:
            self._float.close()
            self._float = None


def _judge(sessions: _Sessions, model: ir.Model, held_back: Sequence[Feeds], expected) -> Judgement:
    return judge(model, held_back, expected, sessions.threads, runner=sessions.runner(model))


def _latency_ratio(sessions: _Sessions, quantized: ir.Model, feeds: Feeds) -> float:
    runners = [_Fed(sessions.float_runner()), _Fed(sessions.runner(quantized))]
    start = time.perf_counter()
    for runner in runners:
        runner.run(feeds)
    one_round = time.perf_counter() - start
    # Sub-millisecond models need many rounds for a stable median; big ones few.
    repeats = int(min(MAX_SPEED_ROUNDS, max(MIN_SPEED_ROUNDS, SPEED_CHECK_SECONDS / max(one_round, 1e-6))))
    float_seconds, int8_seconds = measure_latency(runners, feeds, warmup=3, repeats=repeats)
    return int8_seconds / float_seconds if float_seconds > 0 else 1.0


class _Fed:
    """A runner that takes only the feeds its model needs."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner

    def run(self, feeds: Feeds) -> object:
        return self.runner.run(self.runner.own(feeds))


def _float_input(node: ir.Node) -> str | None:
    """The float tensor behind a node's first input (through a Q/DQ pair), by name."""
    value = node.inputs[0] if node.inputs else None
    if value is None:
        return None
    producer = value.producer()
    if producer is not None and producer.op_type == "DequantizeLinear" and producer.inputs[0] is not None:
        quantize = producer.inputs[0].producer()
        if quantize is not None and quantize.op_type == "QuantizeLinear" and quantize.inputs[0] is not None:
            value = quantize.inputs[0]
    return value.name if value.producer() is not None else None


def _node_outputs(model: ir.Model) -> set[str]:
    return {value.name for node in model.graph for value in node.outputs if value.name}


def _rel_l2(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], name: str) -> float:
    if name not in reference or name not in candidate:
        return 0.0
    ref = reference[name].astype(np.float64).ravel()
    diff = candidate[name].astype(np.float64).ravel() - ref
    norm = float(np.linalg.norm(ref))
    return float(np.linalg.norm(diff)) / norm if norm > 0 else float(np.linalg.norm(diff))
