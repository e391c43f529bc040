"""Every compression method on the real models, side by side: size, task metric and latency.

Run from the repository root (part of ``make bench``)::

    .venv/bin/python bench/methods.py [--models digits_cnn,minilm] [--markdown] [--plots DIR]

Models (``model_zoo.real``, the ``zoo`` extra): ``digits_cnn`` (a small CNN
trained on scikit-learn's digits; task metric: top-1 accuracy on the test
split, the first 64 test images kept for calibration) and ``minilm``
(all-MiniLM-L6-v2; task metrics: per-sentence embedding cosine against the
original and top-10 nearest-neighbour agreement over the sentence file, the
first 32 sentences kept for calibration). A model whose builder is missing
(no torch for the export) is reported as skipped.

Methods: the pipelines in METHODS, each from the original file, with the
calibration samples as ``--calib-data``. Printed per method: file size ratio
(rewritten / original bytes), the task metric, and onnxruntime CPU latency
ratio (1 thread, interleaved medians). With ``--plots DIR`` and matplotlib,
writes ``DIR/<model>_size_vs_fidelity.png`` and ``DIR/<model>_latency.png``.
A benchmark: it exits 0 whatever the outcome, and 2 on bad arguments.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cli_args import OneLineParser  # bench/ is on sys.path when run as a script
from tables import table
from timing import latencies, session

_REPO_ROOT = Path(__file__).resolve().parent.parent
METHODS = (
    "fold",
    "fold,prune(pattern=channel,reconstruct=true)",
    "fold,lowrank(data_aware=true)",
    "fold,lowrank(target_cosine=0.99,data_aware=true)",
    "fold,qdq",
    "fold,prune(pattern=channel,reconstruct=true),qdq",
)
DEFAULT_MODELS = ("digits_cnn", "minilm")
_HEADERS = ("method", "size ratio", "task metric", "latency ratio", "pass s")


def _digits() -> tuple[Any, list[dict], list[dict], Any]:
    from model_zoo import digits

    zoo = digits.digits_cnn()
    images, labels = digits.test_split()
    calibration = [{"image": images[i : i + 16]} for i in range(0, 64, 16)]
    evaluation = [{"image": images[64:]}]

    def metric(model: Any) -> tuple[str, float]:
        accuracy = digits.accuracy(model, images[64:], labels[64:])
        return f"top-1 {accuracy:.4f}", accuracy

    return zoo, calibration, evaluation, metric


def _minilm() -> tuple[Any, list[dict], list[dict], Any]:
    import numpy as np

    from graphopt.runtime import ModelRunner
    from model_zoo import minilm

    zoo = minilm.minilm()
    sentences = minilm.load_sentences()
    calibration = minilm.tokenize_batches(sentences[:32], 8, 64)
    evaluation_feeds = minilm.tokenize(sentences[32:], 64)

    def embeddings(model: Any) -> np.ndarray:
        with ModelRunner(model, threads=1) as runner:
            hidden = runner.run(evaluation_feeds)["last_hidden_state"]
        return minilm.sentence_embeddings(hidden, evaluation_feeds["attention_mask"])

    from graphopt import load

    reference = embeddings(load(zoo.model))

    def metric(model: Any) -> tuple[str, float]:
        got = embeddings(model)
        cosine = float(minilm.embedding_cosine(reference, got).mean())
        agreement = minilm.neighbour_agreement(reference, got, k=10)
        return f"cosine {cosine:.4f}, top-10 agreement {agreement:.3f}", cosine

    return zoo, calibration, [evaluation_feeds], metric


_BUILDERS = {"digits_cnn": _digits, "minilm": _minilm}


def run_model(name: str) -> tuple[list[tuple[str, ...]], list[tuple[str, float, float, float]]]:
    """Rows for the table and (method, size ratio, fidelity, latency ratio) points for the plots."""
    import numpy as np

    from graphopt import load, run_pipeline, save
    from graphopt.registry import with_calibration_data
    from graphopt.spec import parse_spec

    zoo, calibration, evaluation, metric = _BUILDERS[name]()
    work = Path(tempfile.mkdtemp(prefix=f"graphopt-methods-{name}-"))
    original_path = zoo.save(work)
    calib_dir = work / "calib"
    calib_dir.mkdir()
    for index, feeds in enumerate(calibration):
        np.savez(calib_dir / f"{index:03d}.npz", **feeds)
    outputs: dict[str, tuple[Path, float]] = {}
    for method in METHODS:
        print(f"  {method}...", file=sys.stderr, flush=True)
        model = load(original_path)
        started = time.perf_counter()
        run_pipeline(model, with_calibration_data(parse_spec(method), calib_dir))
        outputs[method] = (save(model, work / f"{len(outputs)}.onnx"), time.perf_counter() - started)
    original = load(original_path)
    sessions = [session(original)] + [session(load(path)) for path, _ in outputs.values()]
    times = latencies(sessions, evaluation[0])
    base_size = _file_bytes(original_path)
    rows, points = [], []
    reference_text, _ = metric(original)
    rows.append(("original", "1.000", reference_text, "1.00", ""))
    for (method, (path, seconds)), latency in zip(outputs.items(), times[1:]):
        text, value = metric(load(path))
        size = _file_bytes(path) / base_size
        rows.append((f"`{method}`", f"{size:.3f}", text, f"{latency / times[0]:.2f}", f"{seconds:.1f}"))
        points.append((method, size, value, latency / times[0]))
    return rows, points


def _file_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.iterdir() if p.name == path.name or p.name.startswith(path.name + "."))


def _plot(name: str, points: list[tuple[str, float, float, float]], folder: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    figure, axes = plt.subplots(figsize=(6, 4))
    for method, size, fidelity, _ in points:
        axes.scatter(size, fidelity)
        axes.annotate(method, (size, fidelity), fontsize=6)
    axes.set(xlabel="size ratio (rewritten / original)", ylabel="task metric", title=f"{name}: size vs fidelity")
    figure.tight_layout()
    written.append(folder / f"{name}_size_vs_fidelity.png")
    figure.savefig(written[-1], dpi=120)
    plt.close(figure)
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.barh([method for method, *_ in points], [latency for *_, latency in points])
    axes.axvline(1.0, color="black", linewidth=0.8)
    axes.set(xlabel="latency ratio (rewritten / original, 1 thread)", title=f"{name}: latency")
    axes.tick_params(axis="y", labelsize=6)
    figure.tight_layout()
    written.append(folder / f"{name}_latency.png")
    figure.savefig(written[-1], dpi=120)
    plt.close(figure)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help=f"comma-separated: {', '.join(_BUILDERS)}")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--plots", type=Path, help="folder for PNG plots (needs matplotlib)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in _BUILDERS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; valid: {', '.join(_BUILDERS)}")
    sys.path.insert(0, str(_REPO_ROOT))
    for name in names:
        print(f"{name}...", file=sys.stderr, flush=True)
        try:
            rows, points = run_model(name)
        except ImportError as exc:
            print(f"{name}: skipped ({exc})\n")
            continue
        print(f"### {name}\n" if args.markdown else name)
        print(table(_HEADERS, rows, args.markdown) + "\n")
        for path in _plot(name, points, args.plots) if args.plots else []:
            print(f"![{path.stem}]({path.as_posix()})\n" if args.markdown else f"plot: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
