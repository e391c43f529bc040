"""Tests for graphopt.data: input specs, shapes, integer ranges, synthesized and loaded feeds."""

from __future__ import annotations

import functools
import os
import threading
import types

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import run_ort
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.data import (
    DEFAULT_SEQUENCE_DIM,
    InputSpec,
    feed_stream,
    input_specs,
    integer_input_ranges,
    load_feeds,
    parse_shape_overrides,
    resolve_shape,
    synthesize_feeds,
)
from graphopt.errors import DataError

TABLE_ROWS = 30


def _model(text: str, **initializers: np.ndarray) -> ir.Model:
    proto = onnx.parser.parse_model(text)
    proto.graph.initializer.extend(numpy_helper.from_array(array, name) for name, array in initializers.items())
    return graphopt.load(proto)


@functools.cache
def _embedding_proto() -> onnx.ModelProto:
    """ids -> Cast(int32) -> Unsqueeze(axis 2) -> Gather(emb[30, 8]); mask -> Identity; x * w.

    ``w`` is an initializer listed among the inputs (an overridable default).
    """
    model = _model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (int64[batch, seq] ids, int64[batch, seq] mask, float[batch, 4] x, float[4] w)
            => (float[batch, seq, 1, 8] y, int64[batch, seq] m, float[batch, 4] z) {
            ids32 = Cast<to = 6>(ids)
            axes = Constant<value = int64[1] {2}>()
            ids3 = Unsqueeze(ids32, axes)
            y = Gather(emb, ids3)
            m = Identity(mask)
            z = Mul(x, w)
        }
        """,
        emb=np.random.default_rng(0).standard_normal((TABLE_ROWS, 8)).astype(np.float32),
        w=np.ones(4, np.float32),
    )
    return ir.to_proto(model)


def _embedding_model() -> ir.Model:
    return graphopt.load(_embedding_proto())


def _kinds_model() -> ir.Model:
    return _model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float16[2, 3] h, bool[N] b, uint8[4] u, double[time] d) => (float16[2, 3] h2, bool[N] b2, uint8[4] u2, double[time] d2) {
            h2 = Identity(h)
            b2 = Identity(b)
            u2 = Identity(u)
            d2 = Identity(d)
        }
        """
    )


def _single_input_model(value_info: onnx.ValueInfoProto) -> ir.Model:
    output = helper.make_tensor_value_info("y", value_info.type.tensor_type.elem_type, None)
    graph = helper.make_graph([helper.make_node("Identity", [value_info.name], ["y"])], "g", [value_info], [output])
    return graphopt.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def _sample(ids_dtype=np.int64, **overrides) -> dict[str, np.ndarray]:
    sample = {
        "ids": np.array([[1, 2, 3]], ids_dtype),
        "mask": np.array([[1, 1, 0]], np.int64),
        "x": np.zeros((1, 4), np.float32),
    }
    sample.update(overrides)
    return {k: v for k, v in sample.items() if v is not None}


# --- input specs and shapes ---------------------------------------------------------------


def test_input_specs_skip_inputs_when_they_are_also_initializers():
    specs = input_specs(_embedding_model())

    assert specs == [
        InputSpec("ids", np.dtype(np.int64), ("batch", "seq")),
        InputSpec("mask", np.dtype(np.int64), ("batch", "seq")),
        InputSpec("x", np.dtype(np.float32), ("batch", 4)),
    ]


def test_input_spec_shape_is_none_when_rank_is_unknown():
    model = _single_input_model(helper.make_tensor_value_info("x", TensorProto.FLOAT, None))

    assert input_specs(model) == [InputSpec("x", np.dtype(np.float32), None)]


def test_parse_shape_overrides_splits_at_last_colon_when_name_has_colons():
    overrides = parse_shape_overrides(["x:2x4", "input:0:1X3x224x224", "s:7"])

    assert overrides == {"x": (2, 4), "input:0": (1, 3, 224, 224), "s": (7,)}


@pytest.mark.parametrize("item", ["x", "x:", ":2x3", "x:2x", "x:2xa", "x:-1x4", "x:2,4", "x:²"])
def test_parse_shape_overrides_raises_data_error_when_item_is_malformed(item):
    with pytest.raises(DataError, match=r"^bad shape .*expected name:DIMxDIM"):
        parse_shape_overrides([item])


def test_parse_shape_overrides_raises_data_error_when_a_name_repeats():
    with pytest.raises(DataError, match="shape for input 'x' is given twice"):
        parse_shape_overrides(["x:1x4", "x:2x4"])


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        (("batch", "seq"), (1, DEFAULT_SEQUENCE_DIM)),
        (("N", 3, None), (1, 3, 1)),
        (("Sequence_Length", "time_steps", "num_tokens", "max_len"), (16, 16, 16, 16)),
        ((), ()),
    ],
)
def test_resolve_shape_uses_documented_defaults_when_dims_are_dynamic(shape, expected):
    assert resolve_shape(InputSpec("x", np.dtype(np.float32), shape), None) == expected


def test_resolve_shape_prefers_override_when_one_is_given():
    spec = InputSpec("x", np.dtype(np.float32), ("batch", 4))

    assert resolve_shape(spec, {"x": (3, 4)}) == (3, 4)
    assert resolve_shape(InputSpec("y", np.dtype(np.float32), None), {"y": [2, 5]}) == (2, 5)


@pytest.mark.parametrize("override", [(3, 5), (3,), (3, 4, 1), (-1, 4)])
def test_resolve_shape_raises_data_error_when_override_does_not_fit(override):
    spec = InputSpec("x", np.dtype(np.float32), ("batch", 4))

    with pytest.raises(DataError, match=r"given for input 'x' does not fit the model's \(batch, 4\)"):
        resolve_shape(spec, {"x": override})


def test_resolve_shape_raises_data_error_when_rank_is_unknown_without_override():
    with pytest.raises(DataError, match=r"^input 'x' has unknown rank; pass --shape x:\.\.\.$"):
        resolve_shape(InputSpec("x", np.dtype(np.float32), None), {})


# --- integer ranges ------------------------------------------------------------------------


def test_integer_ranges_follow_cast_and_unsqueeze_when_ids_index_an_embedding():
    assert integer_input_ranges(_embedding_model()) == {"ids": (0, TABLE_ROWS), "mask": (0, 2)}


@pytest.mark.parametrize("axis", [1, -1])
def test_integer_range_uses_the_gather_axis_when_axis_is_set(axis):
    model = _model(
        f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (int32[n] ids) => (float[8, n] y) {{
            flat = Flatten<axis = 0>(ids)
            back = Reshape(flat, shape)
            y = Gather<axis = {axis}>(table, back)
        }}
        """,
        table=np.zeros((8, TABLE_ROWS), np.float32),
        shape=np.array([-1], np.int64),
    )

    assert integer_input_ranges(model) == {"ids": (0, TABLE_ROWS)}


def test_integer_range_takes_the_smallest_table_when_ids_feed_several_gathers():
    model = _model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (int64[n] ids) => (float[n, 8] a, float[n, 2] b) {
            a = Gather(big, ids)
            same = Identity(ids)
            small = Constant<value = float[5, 2] {0, 0, 0, 0, 0, 0, 0, 0, 0, 0}>()
            b = Gather(small, same)
        }
        """,
        big=np.zeros((TABLE_ROWS, 8), np.float32),
    )

    assert integer_input_ranges(model) == {"ids": (0, 5)}


def test_integer_range_is_default_when_ids_are_the_gather_data_or_table_is_not_constant():
    model = _model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (int64[n] ids, int64[4] idx, float[9, 2] table) => (int64[4] a, float[4, 2] b) {
            a = Gather(ids, idx)
            b = Gather(table, idx)
        }
        """
    )

    assert integer_input_ranges(model) == {"ids": (0, 2), "idx": (0, 2)}


# --- synthesized feeds ---------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), batch=st.integers(1, 4), seq=st.integers(1, 64))
def test_synthesized_ids_stay_inside_the_table_when_seed_and_shape_vary(seed, batch, seq):
    model = _embedding_model()

    (feeds,) = synthesize_feeds(model, count=1, seed=seed, shapes={"ids": (batch, seq)})

    assert feeds["ids"].shape == (batch, seq) and feeds["ids"].dtype == np.int64
    assert feeds["ids"].min() >= 0 and feeds["ids"].max() < TABLE_ROWS
    assert set(np.unique(feeds["mask"])) <= {0, 1}


def test_synthesized_feeds_run_in_onnxruntime_when_defaults_apply():
    model = _embedding_model()

    for feeds in synthesize_feeds(model, count=3, seed=5):
        outputs = run_ort(_embedding_proto(), feeds)
        assert outputs[0].shape == (1, DEFAULT_SEQUENCE_DIM, 1, 8)


def test_synthesized_feeds_are_identical_when_seed_is_the_same():
    model = _embedding_model()

    first = list(synthesize_feeds(model, count=3, seed=7))
    again = list(synthesize_feeds(model, count=3, seed=7))
    longer = list(synthesize_feeds(model, count=5, seed=7))
    other = next(synthesize_feeds(model, count=1, seed=8))

    for a, b, c in zip(first, again, longer):
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])
            np.testing.assert_array_equal(a[name], c[name])
    assert not np.array_equal(first[0]["x"], other["x"])


def test_synthesized_float_is_standard_normal_from_the_seed_when_it_is_the_only_input():
    model = _single_input_model(helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]))

    (feeds,) = synthesize_feeds(model, count=1, seed=3)

    np.testing.assert_array_equal(feeds["x"], np.random.default_rng(3).standard_normal((2, 3)).astype(np.float32))


def test_synthesized_feeds_match_each_dtype_when_inputs_are_float16_bool_uint8_double():
    (feeds,) = synthesize_feeds(_kinds_model(), count=1, seed=0, shapes={"b": (50,)})

    assert {name: (a.dtype, a.shape) for name, a in feeds.items()} == {
        "h": (np.dtype(np.float16), (2, 3)),
        "b": (np.dtype(np.bool_), (50,)),
        "u": (np.dtype(np.uint8), (4,)),
        "d": (np.dtype(np.float64), (16,)),
    }
    assert feeds["b"].any() and not feeds["b"].all()
    assert set(np.unique(feeds["u"])) <= {0, 1}


def test_synthesize_raises_data_error_when_input_is_a_string():
    model = _single_input_model(helper.make_tensor_value_info("text", TensorProto.STRING, [1]))

    with pytest.raises(DataError, match="input 'text' has dtype object: cannot synthesize it; pass --data"):
        synthesize_feeds(model, count=1)


def test_synthesize_raises_data_error_at_the_call_when_shape_names_an_unknown_input():
    with pytest.raises(DataError, match="shape given for unknown input 'idz'; the model's inputs are: ids, mask, x"):
        synthesize_feeds(_embedding_model(), count=1, shapes={"idz": (1, 4)})


def test_synthesize_raises_data_error_when_rank_is_unknown():
    model = _single_input_model(helper.make_tensor_value_info("x", TensorProto.FLOAT, None))

    with pytest.raises(DataError, match="unknown rank"):
        synthesize_feeds(model, count=1)
    assert next(synthesize_feeds(model, count=1, shapes={"x": (2, 2)}))["x"].shape == (2, 2)


def test_feed_stream_synthesizes_count_samples_when_data_is_none():
    assert len(list(feed_stream(_embedding_model(), count=4))) == 4


def test_feed_stream_ignores_count_when_data_is_given():
    assert len(list(feed_stream(_embedding_model(), [_sample(), _sample()], count=5))) == 2


# --- loaded feeds --------------------------------------------------------------------------


def test_npz_folder_is_read_in_file_name_order_when_files_were_written_out_of_order(tmp_path):
    for index in (2, 0, 1):
        np.savez(tmp_path / f"{index:02d}.npz", **_sample(mask=np.full((1, 3), index, np.int64)))
    (tmp_path / "notes.txt").write_text("ignored")

    samples = list(load_feeds(tmp_path, model=_embedding_model()))

    assert [int(s["mask"][0, 0]) for s in samples] == [0, 1, 2]


def test_npz_files_are_opened_one_at_a_time_when_streaming(tmp_path, monkeypatch):
    for index in range(3):
        np.savez(tmp_path / f"{index}.npz", **_sample())
    opened = []
    real_load = np.load
    monkeypatch.setattr(np, "load", lambda path, **kw: opened.append(path) or real_load(path, **kw))

    stream = load_feeds(str(tmp_path), model=_embedding_model())
    assert opened == []
    next(stream)

    assert len(opened) == 1


def test_single_npz_file_is_cast_and_labels_dropped_when_model_is_given(tmp_path):
    path = tmp_path / "one.npz"
    np.savez(path, **_sample(ids_dtype=np.int32, x=np.zeros((2, 4), np.float64), labels=np.array([3])))

    (feeds,) = load_feeds(path, model=_embedding_model())

    assert set(feeds) == {"ids", "mask", "x"}
    assert (feeds["ids"].dtype, feeds["x"].dtype, feeds["x"].shape) == (np.int64, np.float32, (2, 4))


def test_samples_pass_through_unchecked_when_no_model_is_given(tmp_path):
    np.savez(tmp_path / "one.npz", anything=np.arange(3), labels=np.array([1]))

    (feeds,) = load_feeds(tmp_path / "one.npz")

    assert set(feeds) == {"anything", "labels"}


def test_iterables_and_single_dicts_are_feeds_when_passed_directly():
    model = _embedding_model()
    generator = (_sample(mask=np.full((1, 3), i, np.int64)) for i in range(3))

    assert len(list(load_feeds([_sample(), _sample()], model=model))) == 2
    assert [int(s["mask"][0, 0]) for s in load_feeds(generator, model=model)] == [0, 1, 2]
    assert len(list(load_feeds(_sample(), model=model))) == 1
    assert next(load_feeds([{"ids": [[1, 2]]}]))["ids"].shape == (1, 2)  # arrays even when unchecked


def test_object_with_get_next_is_read_until_none_when_it_is_a_calibration_reader():
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([_sample(), _sample(), _sample()])

        def get_next(self):
            return next(self.items, None)

    duck = types.SimpleNamespace(get_next=iter([_sample(), None, _sample()]).__next__)

    assert len(list(load_feeds(Reader(), model=_embedding_model()))) == 3
    assert len(list(load_feeds(duck, model=_embedding_model()))) == 1


def test_initializer_backed_input_is_accepted_when_the_sample_overrides_it():
    (feeds,) = load_feeds([_sample(w=np.full(4, 2.0, np.float32))], model=_embedding_model())

    assert feeds["w"].tolist() == [2.0, 2.0, 2.0, 2.0]


def test_load_raises_data_error_when_path_is_missing(tmp_path):
    with pytest.raises(DataError, match="no such data file or folder: .*nowhere"):
        load_feeds(tmp_path / "nowhere")


def test_load_raises_data_error_when_folder_holds_no_npz(tmp_path):
    (tmp_path / "a.npy").write_bytes(b"")

    with pytest.raises(DataError, match="the folder holds no .npz files"):
        load_feeds(tmp_path)


@pytest.mark.parametrize("kind", ["text", "npy", "pickled"])
def test_load_raises_data_error_when_file_is_not_a_readable_npz(tmp_path, kind):
    path = tmp_path / "bad.npz"
    if kind == "text":
        path.write_text("not a zip archive")
    elif kind == "npy":
        with open(path, "wb") as handle:
            np.save(handle, np.zeros(3))
    else:
        np.savez(path, ids=np.array([{"a": 1}], dtype=object))

    # A text or .npy file was read as a pickle, and refusing that blamed it for "pickled (object) data".
    expected = "not a readable .npz file" if kind == "pickled" else r"not an \.npz archive \(a zip of \.npy arrays"
    with pytest.raises(DataError, match=r"bad\.npz: " + expected):
        list(load_feeds(path))


def test_load_raises_data_error_naming_sample_and_file_when_an_input_is_missing(tmp_path):
    np.savez(tmp_path / "a.npz", **_sample())
    np.savez(tmp_path / "b.npz", **_sample(ids=None))
    stream = load_feeds(tmp_path, model=_embedding_model())

    next(stream)
    with pytest.raises(DataError, match=r"^sample 1 \(b\.npz\): missing input 'ids'$"):
        next(stream)


def test_load_raises_data_error_listing_inputs_when_a_key_is_unknown():
    with pytest.raises(DataError, match=r"^sample 0: unknown input 'idz'; the model's inputs are: ids, mask, x, w$"):
        list(load_feeds([_sample(idz=np.zeros(1))], model=_embedding_model()))


def test_load_raises_data_error_naming_both_when_a_key_is_misspelt():
    sample = _sample(ids=None, idz=np.zeros((1, 3), np.int64))

    with pytest.raises(DataError, match=r"^sample 0: missing input 'ids'; unknown input 'idz'; the model's inputs are: "):
        list(load_feeds([sample], model=_embedding_model()))


def test_load_raises_data_error_when_dtype_cannot_be_cast_safely():
    with pytest.raises(DataError, match=r"input 'ids' has dtype float32, expected int64 \(not a safe cast\)"):
        list(load_feeds([_sample(ids_dtype=np.float32)], model=_embedding_model()))


def _narrow_model() -> ir.Model:
    return _model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (int32[N] ids, float16[N] h, float[N] f) => (int32[N] ids2, float16[N] h2, float[N] f2) {
            ids2 = Identity(ids)
            h2 = Identity(h)
            f2 = Identity(f)
        }
        """
    )


def _narrow_sample(**overrides) -> dict[str, np.ndarray]:
    sample = {"ids": np.array([5, 7], np.int32), "h": np.array([1.0, 2.0], np.float16), "f": np.zeros(2, np.float32)}
    return {**sample, **overrides}


@pytest.mark.parametrize(
    ("key", "values", "message"),
    [
        # int64 ids that int32 wraps: 2**32 + 5 became 5 and validation compared the wrong tokens.
        ("ids", np.array([7, 2**32 + 5], np.int64), r"int64, expected int32: value 4294967301 does not fit int32 \(it would become 5\)$"),
        ("ids", np.array([7, -(2**31) - 1], np.int64), r"value -2147483649 does not fit int32 \(it would become 2147483647\)$"),
        ("h", np.array([np.nan, 1e5], np.float64), r"float64, expected float16: value 100000\.0 overflows float16 \(it would become inf\)$"),
        ("f", np.array([1.0, -1e39], np.float64), r"float64, expected float32: value -1e\+39 overflows float32 \(it would become -inf\)$"),
    ],
)
def test_load_raises_data_error_naming_the_value_when_a_cast_would_change_it(key, values, message):
    with pytest.raises(DataError, match=rf"^sample 0: input '{key}' has dtype .*{message}"):
        list(load_feeds([_narrow_sample(**{key: values})], model=_narrow_model()))


def test_casts_are_accepted_when_values_survive_them_nan_inf_and_float_rounding_included():
    sample = _narrow_sample(
        ids=np.array([-(2**31), 2**31 - 1], np.int64),
        h=np.array([np.nan, -np.inf], np.float64),
        f=np.array([0.1, 3.4e38], np.float64),
    )

    (feeds,) = load_feeds([sample], model=_narrow_model())

    assert feeds["ids"].dtype == np.int32 and feeds["ids"].tolist() == [-(2**31), 2**31 - 1]
    assert feeds["h"].dtype == np.float16 and np.isnan(feeds["h"][0]) and feeds["h"][1] == -np.inf
    assert feeds["f"].dtype == np.float32
    np.testing.assert_allclose(feeds["f"], [0.1, 3.4e38], rtol=1e-7)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
@pytest.mark.parametrize("keep_model", [True, False])
def test_load_raises_data_error_at_once_when_the_path_is_a_fifo(tmp_path, keep_model):
    # np.load blocked forever opening a FIFO with no writer; the call runs in a thread so that old code fails, not hangs.
    fifo = tmp_path / "data.npz"
    os.mkfifo(fifo)
    outcome: list[BaseException | None] = []

    def read() -> None:
        try:
            list(load_feeds(fifo, model=_narrow_model() if keep_model else None))
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome.append(exc)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    thread.join(timeout=10)
    if thread.is_alive():
        with open(fifo, "wb"):  # release the blocked reader so the daemon thread can end
            pass
        pytest.fail("load_feeds blocked on a FIFO")
    assert len(outcome) == 1 and isinstance(outcome[0], DataError)
    assert str(outcome[0]) == f"{fifo}: not a regular file or folder (a FIFO or device?): give an .npz file or a folder"


def test_load_raises_data_error_with_both_shapes_when_static_dims_disagree():
    with pytest.raises(DataError, match=r"^sample 0: input 'x' has shape \(1, 5\), expected \(batch, 4\)$"):
        list(load_feeds([_sample(x=np.zeros((1, 5), np.float32))], model=_embedding_model()))


def test_load_raises_data_error_when_rank_differs():
    with pytest.raises(DataError, match=r"input 'ids' has shape \(3,\), expected \(batch, seq\)"):
        list(load_feeds([_sample(ids=np.array([1, 2, 3]))], model=_embedding_model()))


def test_load_raises_data_error_when_an_item_is_not_a_dict():
    with pytest.raises(DataError, match="sample 1: expected a dict of input name -> array, got a list"):
        list(load_feeds([_sample(), [1, 2]]))


def test_load_raises_data_error_when_source_type_is_unsupported():
    with pytest.raises(DataError, match="cannot read feeds from a int"):
        load_feeds(5)


def test_synthesize_raises_data_error_naming_the_type_when_an_input_is_a_sequence():
    # A sequence input has its element's dtype, so it was drawn as a tensor that
    # onnxruntime then refused with "expected to be of type: 4 but received a tensor".
    graph = helper.make_graph(
        [helper.make_node("SequenceLength", ["s"], ["n"])],
        "g",
        [helper.make_tensor_sequence_value_info("s", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("n", TensorProto.INT64, [])],
    )
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))

    with pytest.raises(DataError, match=r"input 's' is a Sequence\(Tensor\(FLOAT\)\), not a tensor"):
        synthesize_feeds(model, count=1)


def test_raw_byte_arrays_are_read_as_the_inputs_ml_dtype_when_npz_stored_bfloat16(tmp_path):
    # np.savez writes ml_dtypes arrays as raw bytes ('|V2'); reading them back failed as "not a safe cast".
    import ml_dtypes

    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
    )
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    x = np.array([1.5, -2.0, 0.25], dtype=ml_dtypes.bfloat16)
    np.savez(tmp_path / "d.npz", x=x)

    (sample,) = load_feeds(tmp_path / "d.npz", model=model)

    assert sample["x"].dtype == x.dtype and np.array_equal(sample["x"], x)

