"""Plug-in passes from the ``graphopt.passes`` entry points: what is registered, what is refused, and warned once."""

from __future__ import annotations

import logging
from importlib import metadata

import onnx_ir as ir
import pytest

from graphopt import PassSpec, registry
from graphopt.errors import PipelineSpecError


class _PluginPass(ir.passes.InPlacePass):
    """A plug-in's pass that does nothing."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return ir.passes.PassResult(model, False)


class _NotAPass:
    """A class that is no onnx_ir pass."""

    def __init__(self, **options: object) -> None:
        del options


def _factory(*, level: int = 1) -> ir.passes.PassBase:
    del level
    return _PluginPass()


def _returns_a_string() -> str:
    return "not a pass"


class _EntryPoint:
    def __init__(self, name: str, value: str, loaded: object) -> None:
        self.name, self.value, self.loaded = name, value, loaded

    def load(self) -> object:
        if isinstance(self.loaded, Exception):
            raise self.loaded
        return self.loaded


_ENTRY_POINTS = [
    _EntryPoint("plugin-pass", "plug:PluginPass", _PluginPass),
    _EntryPoint("plugin-factory", "plug:factory", _factory),
    _EntryPoint("plugin-string", "plug:returns_a_string", _returns_a_string),
    _EntryPoint("plugin-not-a-pass", "plug:NotAPass", _NotAPass),
    _EntryPoint("plugin-constant", "plug:LEVEL", 3),
    _EntryPoint("dce", "plug:Clash", _PluginPass),
    _EntryPoint("plugin-missing", "plug:Missing", AttributeError("module 'plug' has no attribute 'Missing'")),
]


@pytest.fixture()
def plugins(monkeypatch):
    """The entry points above, read as if installed, with no warning given yet in this process."""
    real = metadata.entry_points

    def entry_points(**kwargs):
        return list(_ENTRY_POINTS) if kwargs.get("group") == registry.ENTRY_POINT_GROUP else real(**kwargs)

    monkeypatch.setattr(metadata, "entry_points", entry_points)
    monkeypatch.setattr(registry, "_warned", set())


def test_entry_points_that_cannot_make_a_pass_are_skipped_with_a_warning(plugins, caplog):
    from passes.dce import EliminateDeadCodePass

    with caplog.at_level(logging.WARNING, logger="graphopt.registry"):
        found = registry.available_passes()

    assert found["plugin-pass"] is _PluginPass and found["plugin-factory"] is _factory
    assert found["dce"] is EliminateDeadCodePass  # a clash keeps the built-in
    # A function is a factory, checked when it is called; a class must be a pass; a constant is neither.
    assert "plugin-string" in found
    assert "plugin-not-a-pass" not in found and "plugin-constant" not in found and "plugin-missing" not in found
    messages = [record.getMessage() for record in caplog.records]
    assert "entry point plugin-not-a-pass = plug:NotAPass ignored: class _NotAPass is not an onnx_ir pass (PassBase)" in messages
    assert "entry point plugin-constant = plug:LEVEL ignored: 3 (int) is neither a pass class nor a factory function" in messages
    assert len(messages) == 4, messages  # not-a-pass, constant, clash, missing


def test_each_plugin_warning_is_given_once_per_process(plugins, caplog):
    with caplog.at_level(logging.WARNING, logger="graphopt.registry"):
        for _ in range(3):  # as optimize does, from several places
            registry.available_passes()

    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 4 and len(set(messages)) == 4, messages


def test_available_passes_is_a_fresh_dict_on_every_call(plugins):
    first = registry.available_passes()
    first["dce"] = _PluginPass
    del first["plugin-pass"]

    second = registry.available_passes()

    assert second["dce"] is not _PluginPass and second["plugin-pass"] is _PluginPass


def test_a_factory_that_returns_no_pass_is_a_spec_error(plugins):
    with pytest.raises(PipelineSpecError, match="^pass 'plugin-string': its factory returned a str, not an onnx_ir pass$"):
        registry.create_pass(PassSpec("plugin-string"))
    assert isinstance(registry.create_pass(PassSpec("plugin-factory", {"level": "2"})), _PluginPass)


def test_a_class_that_is_no_pass_is_an_unknown_pass(plugins):
    with pytest.raises(PipelineSpecError, match="^unknown pass 'plugin-not-a-pass'; valid passes: .*plugin-pass"):
        registry.create_pass(PassSpec("plugin-not-a-pass"))
