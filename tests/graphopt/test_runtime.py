"""graphopt.runtime: providers, session options, ModelRunner and latency timing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

import graphopt
from graphopt import providers, runtime
from graphopt.errors import GraphoptError, UnsupportedModelError
from graphopt.providers import ProviderStatus, resolve_providers
from graphopt.runtime import ModelRunner, measure_latency, session_options, stream_tensors

RNG = np.random.default_rng(0)
W = RNG.standard_normal((3, 4)).astype(np.float32)
X = RNG.standard_normal((2, 3)).astype(np.float32)
C = RNG.standard_normal((2, 4)).astype(np.float32)
FEEDS = {"x": X, "c": C}
EXPECTED_H = X @ W
EXPECTED_Y = np.maximum(EXPECTED_H + C, 0)
CUDA = resolve_providers(["cuda"])[0]
CUDA_IN_BUILD = "CUDAExecutionProvider" in ort.get_available_providers()


def _proto(weight: np.ndarray = W) -> onnx.ModelProto:
    """x -> MatMul(W) -> h -> Add(c) -> s -> Relu -> y; only y is an output."""
    rows, cols = weight.shape
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("MatMul", ["x", "W"], ["h"], name="matmul"),
            onnx.helper.make_node("Add", ["h", "c"], ["s"], name="add"),
            onnx.helper.make_node("Relu", ["s"], ["y"], name="relu"),
        ],
        "mlp",
        [
            onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, rows]),
            onnx.helper.make_tensor_value_info("c", onnx.TensorProto.FLOAT, [2, cols]),
        ],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, cols])],
        [onnx.numpy_helper.from_array(weight, "W")],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _model() -> ir.Model:
    return graphopt.load(_proto())


def _write(tmp_path: Path, *, external: bool = False, weight: np.ndarray = W) -> Path:
    path = tmp_path / "mlp.onnx"
    onnx.save_model(_proto(weight), path, save_as_external_data=external, location="mlp.onnx.data", size_threshold=0)
    return path


def _assert_one_line(error: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(error.value)
    assert message and "\n" not in message
    return message


def test_runs_an_ir_model_and_a_path_alike(tmp_path):
    with ModelRunner(_model()) as from_ir, ModelRunner(_write(tmp_path)) as from_path:
        assert from_ir.input_names == from_path.input_names == ["x", "c"]
        assert from_ir.output_names == from_path.output_names == ["y"]
        np.testing.assert_allclose(from_ir.run(FEEDS)["y"], EXPECTED_Y, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(from_path.run(FEEDS)["y"], from_ir.run(FEEDS)["y"])


@pytest.mark.parametrize("level", list(runtime.OPTIMIZATION_LEVELS))
def test_optimization_levels_give_the_same_numbers(level):
    with ModelRunner(_model(), optimization=level, threads=1) as runner:
        np.testing.assert_allclose(runner.run(FEEDS)["y"], EXPECTED_Y, rtol=1e-5, atol=1e-6)


def test_unknown_optimization_level_raises_listing_valid_ones():
    with pytest.raises(ValueError, match="'fast'; valid: none, basic, extended, full"):
        session_options(optimization="fast")
    with pytest.raises(ValueError, match="unknown optimization level"):
        ModelRunner(_model(), optimization="fast")


def test_session_options_pin_threads_when_given():
    options = session_options(optimization="none", threads=2)
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (2, 1)
    assert options.log_severity_level == 3
    with pytest.raises(ValueError, match="threads"):
        session_options(threads=0)


def test_extra_outputs_expose_an_intermediate_and_leave_the_model_unchanged():
    model = _model()
    before = ir.to_proto(model).SerializeToString()

    with ModelRunner(model, extra_outputs=["h", "s"]) as runner:
        outputs = runner.run(FEEDS)

    assert runner.output_names == ["y", "h", "s"]
    np.testing.assert_allclose(outputs["h"], EXPECTED_H, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(outputs["y"], EXPECTED_Y, rtol=1e-5, atol=1e-6)
    assert ir.to_proto(model).SerializeToString() == before
    assert [value.name for value in model.graph.outputs] == ["y"]


def test_extra_outputs_without_a_type_run_because_onnxruntime_infers_it():
    model = _model()
    [h] = model.graph.node("matmul").outputs
    assert h.type is None and h.shape is None
    with ModelRunner(model, extra_outputs=["h"]) as runner:
        exposed = runner.run(FEEDS)["h"]
    assert (exposed.dtype, exposed.shape) == (np.float32, (2, 4))


def test_extra_outputs_from_a_path_leave_the_file_unchanged(tmp_path):
    path = _write(tmp_path)
    before = path.read_bytes()
    with ModelRunner(path, extra_outputs=["s"]) as runner:
        np.testing.assert_allclose(runner.run(FEEDS)["s"], EXPECTED_H + C, rtol=1e-5, atol=1e-6)
    assert path.read_bytes() == before


def test_extra_outputs_that_are_already_outputs_are_not_added_twice():
    with ModelRunner(_model(), extra_outputs=["y", "h", "h"]) as runner:
        assert runner.output_names == ["y", "h"]
        assert runner.model_output_names == ["y"]


def test_run_fetches_only_the_named_outputs_when_given_a_subset():
    with ModelRunner(_model(), extra_outputs=["h", "s"]) as runner:
        outputs = runner.run(FEEDS, runner.model_output_names)

    assert runner.model_output_names == ["y"]
    assert list(outputs) == ["y"]
    np.testing.assert_allclose(outputs["y"], EXPECTED_Y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["nope", "W", "x"], ids=["unknown", "initializer", "graph-input"])
def test_extra_output_that_no_main_graph_node_produces_raises_value_error(name):
    with pytest.raises(ValueError, match=f"'{name}'"):
        ModelRunner(_model(), extra_outputs=["h", name])


def test_missing_feed_raises_one_line_error_listing_inputs():
    with ModelRunner(_model()) as runner, pytest.raises(GraphoptError) as error:
        runner.run({"x": X})
    assert _assert_one_line(error) == "missing input 'c' (model inputs: x, c)"


def test_extra_feed_raises_one_line_error():
    with ModelRunner(_model()) as runner, pytest.raises(GraphoptError) as error:
        runner.run({**FEEDS, "z": X})
    assert "unexpected input 'z'" in _assert_one_line(error)


def test_overridable_initializer_is_accepted_as_a_feed():
    proto = _proto()
    proto.graph.input.append(onnx.helper.make_tensor_value_info("W", onnx.TensorProto.FLOAT, [3, 4]))
    with ModelRunner(graphopt.load(proto)) as runner:
        assert runner.input_names == ["x", "c"]
        doubled = runner.run({**FEEDS, "W": 2 * W})["y"]
    np.testing.assert_allclose(doubled, np.maximum(X @ (2 * W) + C, 0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("feeds", "detail"),
    [
        ({"x": np.zeros((2, 5), np.float32), "c": C}, "Got: 5 Expected: 3"),
        ({"x": X.astype(np.float64), "c": C}, "data type"),
    ],
    ids=["wrong-shape", "wrong-dtype"],
)
def test_feeds_onnxruntime_rejects_raise_one_line_error(feeds, detail):
    with ModelRunner(_model()) as runner, pytest.raises(GraphoptError) as error:
        runner.run(feeds)
    message = _assert_one_line(error)
    assert message.startswith("onnxruntime rejected the feeds for model 'mlp': ")
    assert detail in message and "[ONNXRuntimeError]" not in message


def test_model_onnxruntime_cannot_open_raises_graphopt_error(tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(GraphoptError, match="onnxruntime cannot open broken.onnx: ") as error:
        ModelRunner(broken)
    _assert_one_line(error)


def test_resolve_providers_reports_cpu_available():
    [cpu] = resolve_providers(["cpu"])
    assert cpu == ProviderStatus("cpu", "CPUExecutionProvider", True, "")
    assert cpu.to_dict() == {"name": "cpu", "ort_name": "CPUExecutionProvider", "available": True, "reason": ""}


def test_resolve_providers_rejects_unknown_name():
    with pytest.raises(GraphoptError, match="unknown provider 'tpu'; valid: cpu, cuda"):
        resolve_providers(["cpu", "tpu"])


def test_cuda_status_has_a_reason_exactly_when_unavailable():
    assert CUDA.ort_name == "CUDAExecutionProvider"
    assert CUDA.available == (CUDA.reason == "")
    assert "\n" not in CUDA.reason


@pytest.mark.skipif(CUDA_IN_BUILD, reason="this onnxruntime build includes CUDAExecutionProvider")
def test_cuda_is_unavailable_in_a_cpu_build_with_an_install_hint():
    assert not CUDA.available
    assert CUDA.reason == (
        "CUDAExecutionProvider is not in this onnxruntime build (install graphopt[cuda], i.e. onnxruntime-gpu)"
    )
    with pytest.raises(GraphoptError, match="provider cuda is unavailable: CUDAExecutionProvider is not in"):
        ModelRunner(_model(), "cuda")


@pytest.mark.skipif(CUDA_IN_BUILD, reason="needs a build where the CUDA provider cannot start")
def test_probe_detects_onnxruntime_silently_falling_back_to_cpu(monkeypatch):
    # A CPU build asked for CUDA warns and runs on CPU, as onnxruntime-gpu does
    # when CUDA libraries are missing; pretending CUDA is listed exercises that path.
    listed = ort.get_available_providers() + ["CUDAExecutionProvider"]
    monkeypatch.setattr(providers.ort, "get_available_providers", lambda: listed)
    providers._probe.cache_clear()
    try:
        [status] = resolve_providers(["cuda"])
    finally:
        monkeypatch.undo()
        providers._probe.cache_clear()
    assert not status.available
    assert status.reason.startswith(
        "CUDAExecutionProvider could not start, so onnxruntime fell back to CPUExecutionProvider: "
    )
    assert "\n" not in status.reason


def test_native_reason_extracts_the_loader_error():
    # What onnxruntime-gpu 1.31 prints on fd 2 when CUDA 13 libraries are missing.
    log = (
        "\x1b[1;31m2026-11-24 13:48:16.150 [E:onnxruntime:Default, provider_bridge_ort.cc:2458 operator()] "
        "/src/provider_bridge_ort.cc:2043 onnxruntime::Provider& onnxruntime::ProviderLibrary::Get() "
        "[ONNXRuntimeError] : 1 : FAIL : Failed to load library libonnxruntime_providers_cuda.so with error: "
        "libcublasLt.so.13: cannot open shared object file: No such file or directory\n\x1b[m\n"
        "\x1b[0;93m2026-11-24 13:48:16.150 [W:onnxruntime:Default, onnxruntime_pybind_state.cc:1295 "
        "CreateExecutionProviderFactoryInstance] Failed to create CUDAExecutionProvider. Require cuDNN 9.* and "
        "CUDA 13.*. Please install all dependencies as mentioned in the GPU requirements page.\x1b[m\n"
    )
    assert providers._native_reason(log) == (
        "Failed to load library libonnxruntime_providers_cuda.so with error: libcublasLt.so.13: "
        "cannot open shared object file: No such file or directory (Require cuDNN 9.* and CUDA 13.*)"
    )
    assert providers._native_reason("unrelated output\n") == ""


@pytest.mark.skipif(not CUDA.available, reason=f"no CUDA device: {CUDA.reason}")
def test_cuda_runs_when_a_device_is_present():
    with ModelRunner(_model(), "cuda") as gpu, ModelRunner(_model(), "cpu") as cpu:
        np.testing.assert_allclose(gpu.run(FEEDS)["y"], cpu.run(FEEDS)["y"], rtol=1e-4, atol=1e-4)


def _large_matmul() -> tuple[ir.Model, dict[str, np.ndarray], np.ndarray]:
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((1024, 256)).astype(np.float32)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"])],
        "mm",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [64, 1024])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [64, 256])],
        [onnx.numpy_helper.from_array(weight, "w")],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8)
    x = rng.standard_normal((64, 1024)).astype(np.float32)
    return ir.serde.deserialize_model(model), {"x": x}, x.astype(np.float64) @ weight.astype(np.float64)


@pytest.mark.skipif(not CUDA.available, reason=f"no CUDA device: {CUDA.reason}")
def test_cuda_computes_in_full_float32_unless_tf32_is_asked_for():
    model, feeds, exact = _large_matmul()
    with ModelRunner(model, "cuda") as fp32, ModelRunner(model, "cuda", tf32=True) as tf32:
        fp32_error = np.abs(fp32.run(feeds)["y"] - exact).max() / np.abs(exact).max()
        tf32_error = np.abs(tf32.run(feeds)["y"] - exact).max() / np.abs(exact).max()
    # float32 with K=1024 keeps ~1e-6 relative error; TF32's 10-bit mantissa
    # gives ~1e-3 on GPUs that have it (Ampere and newer), else the same as fp32.
    assert fp32_error < 1e-5
    assert tf32_error >= fp32_error


def test_measure_latency_returns_one_positive_median_per_runner():
    with ModelRunner(_model(), threads=1) as first, ModelRunner(_model(), optimization="none", threads=1) as second:
        medians = measure_latency([first, second], FEEDS, warmup=1, repeats=5)
    assert len(medians) == 2 and all(m > 0 for m in medians)


class _Recorder:
    def __init__(self, name: str, calls: list[str]) -> None:
        self.name, self.calls = name, calls

    def run(self, feeds):
        self.calls.append(self.name)
        return {}


def test_measure_latency_interleaves_runs_after_warmup():
    calls: list[str] = []
    measure_latency([_Recorder("a", calls), _Recorder("b", calls)], FEEDS, warmup=2, repeats=3)
    assert calls == ["a", "b"] * 5


@pytest.mark.parametrize(("warmup", "repeats"), [(3, 0), (-1, 5)])
def test_measure_latency_rejects_bad_counts(warmup, repeats):
    with pytest.raises(ValueError):
        measure_latency([_Recorder("a", [])], FEEDS, warmup=warmup, repeats=repeats)


def test_close_ends_the_runner_and_can_be_called_twice():
    runner = ModelRunner(_model())

    runner.close()
    runner.close()

    with pytest.raises(RuntimeError, match="closed"):
        runner.run(FEEDS)


def test_large_weights_are_lent_from_memory_not_copied_into_the_protobuf():
    # 512x256 float32 = 512 KiB: above the lending threshold.
    weight = RNG.standard_normal((512, 256)).astype(np.float32)
    proto = onnx.parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,512] x) => (float[2,256] y) {
          y = MatMul(x, W)
        }
        """
    )
    proto.graph.initializer.append(onnx.numpy_helper.from_array(weight, "W"))
    model = graphopt.load(proto)
    x = RNG.standard_normal((2, 512)).astype(np.float32)
    before = ir.to_proto(model).SerializeToString()

    with ModelRunner(model, extra_outputs=()) as runner:
        assert len(runner._lent) == 1 and runner._lent[0].nbytes == weight.nbytes
        np.testing.assert_allclose(runner.run({"x": x})["y"], x @ weight, rtol=1e-5, atol=1e-5)

    assert ir.to_proto(model).SerializeToString() == before


@pytest.mark.parametrize("extra_outputs", [(), ("h",)], ids=["outputs", "extra-outputs"])
def test_model_with_external_data_runs_from_path_and_from_ir(tmp_path, extra_outputs):
    weight = RNG.standard_normal((3, 256)).astype(np.float32)
    feeds = {"x": X, "c": np.ones((2, 256), np.float32)}
    expected = np.maximum(X @ weight + 1, 0)
    path = _write(tmp_path, external=True, weight=weight)
    assert (tmp_path / "mlp.onnx.data").is_file()
    loaded = graphopt.load(path)

    by_path = ModelRunner(path, extra_outputs=extra_outputs)
    by_ir = ModelRunner(loaded, extra_outputs=extra_outputs)
    with by_path, by_ir:
        for runner in (by_path, by_ir):
            np.testing.assert_allclose(runner.run(feeds)["y"], expected, rtol=1e-5, atol=1e-5)
    # The IR still reads its weights from the user's folder.
    assert isinstance(loaded.graph.initializers["W"].const_value, ir.ExternalTensor)
    with ModelRunner(loaded) as again:
        np.testing.assert_allclose(again.run(feeds)["y"], expected, rtol=1e-5, atol=1e-5)


def test_stream_tensors_yields_intermediates_and_graph_inputs_per_sample():
    model = _model()
    samples = [FEEDS, {**FEEDS, "x": X * 2, "unused": X}]

    streamed = list(stream_tensors(model, ["h", "x", "h"], samples))

    assert [sorted(tensors) for tensors in streamed] == [["h", "x"], ["h", "x"]]
    np.testing.assert_allclose(streamed[0]["h"], EXPECTED_H, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(streamed[1]["h"], 2 * EXPECTED_H, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(streamed[1]["x"], X * 2)
    assert [value.name for value in model.graph.outputs] == ["y"]


def _cast_model(source: int, target: int) -> onnx.ModelProto:
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["same"]), onnx.helper.make_node("Cast", ["x"], ["y"], to=target)],
        "g",
        [onnx.helper.make_tensor_value_info("x", source, [3])],
        [onnx.helper.make_tensor_value_info("same", source, [3]), onnx.helper.make_tensor_value_info("y", target, [3])],
    )
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21)], ir_version=10)


@pytest.mark.parametrize("name", ["bfloat16", "float8_e4m3fn", "float8_e5m2"])
def test_runner_feeds_and_returns_ml_dtypes_arrays_when_inputs_are_bfloat16_or_float8(name):
    # onnxruntime's Python API takes and returns these only as OrtValues: run() failed with
    # "Numpy_type 4 can't be converted to MLDataType" (found by test_cli_node_sweep.py).
    import ml_dtypes

    dtype = np.dtype(getattr(ml_dtypes, name))
    x = np.array([1.5, -2.0, 0.25], dtype=dtype)
    model = ir.serde.deserialize_model(_cast_model(ir.DataType.from_numpy(dtype), onnx.TensorProto.FLOAT))

    with ModelRunner(model) as runner:
        out = runner.run({"x": x})

    assert out["same"].dtype == dtype and np.array_equal(out["same"], x)
    assert out["y"].dtype == np.float32 and np.array_equal(out["y"], x.astype(np.float32))


def test_runner_refuses_in_one_line_when_an_output_is_int4():
    model = ir.serde.deserialize_model(_cast_model(onnx.TensorProto.FLOAT, onnx.TensorProto.INT4))

    with ModelRunner(model) as runner, pytest.raises(UnsupportedModelError, match="cannot return tensor\\(int4\\) output 'y'"):
        runner.run({"x": np.ones(3, np.float32)}, ["y"])


def test_own_keeps_only_the_models_inputs():
    with ModelRunner(_model()) as runner:
        assert runner.own({**FEEDS, "label": np.zeros(2)}).keys() == FEEDS.keys()
