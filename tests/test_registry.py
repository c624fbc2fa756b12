"""The registry mechanism: registration, lookups with the nearest names, plug-ins, and names checked when a config loads."""

from __future__ import annotations

import pytest

import contrastlab
from contrastlab.cli import main
from contrastlab.config.load import config_to_dict, load_config
from contrastlab.config.validate import NAMED
from contrastlab.errors import ConfigError
from contrastlab.registry import METHODS, Registry, import_plugin


def test_register_decorator_lookup_and_listing():
    shapes = Registry("shape", "art.shape", register_with="register_shape")

    @shapes.register("circle", sides=0)
    def circle():
        return "o"

    shapes.register("square", lambda: "[]", sides=4)
    assert shapes["circle"] is circle and shapes["circle"]() == "o"
    assert shapes.info("square")["sides"] == 4
    assert shapes.names() == ["circle", "square"] and shapes.names("c*") == ["circle"]
    assert "circle" in shapes and "triangle" not in shapes and 42 not in shapes and len(shapes) == 2
    with pytest.raises(ConfigError) as info:
        shapes["circel"]
    message = str(info.value)
    assert "art.shape" in message and "'circle'" in message and "circle, square" in message
    assert "register_shape" in message


def test_a_name_cannot_be_registered_twice_by_accident():
    things = Registry("thing")
    things.register("a", object())
    with pytest.raises(ConfigError, match="registered already"):
        things.register("a", object())
    replacement = object()
    things.register("a", replacement, replace=True)
    assert things["a"] is replacement
    with pytest.raises(ConfigError, match="with a name"):
        things.register(None, object())


def test_class_name_attribute_is_the_default_name():
    @contrastlab.register_method()
    class Echo(contrastlab.Method):
        name = "echo_for_registry_test"

    try:
        assert METHODS["echo_for_registry_test"] is Echo
    finally:
        METHODS.unregister("echo_for_registry_test")
    assert "echo_for_registry_test" not in METHODS


@pytest.mark.parametrize("key", list(NAMED))
def test_every_named_key_is_checked_when_the_config_loads(key):
    """A misspelt name fails in load_config (so `train --show` fails as `train` does), naming the key and the
    nearest valid names."""
    registry = NAMED[key]
    valid = registry.names()[0]
    default = config_to_dict(load_config("demo"))
    for part in key.split("."):
        default = default[part]
    listed = isinstance(default, list)  # a list of names: observers, log.to
    with pytest.raises(ConfigError) as info:
        load_config("demo", [f"{key}=[{valid}x]" if listed else f"{key}={valid}x"])
    message = str(info.value)
    assert key in message and repr(valid) in message


def test_show_fails_like_train_for_an_unknown_name(capsys):
    assert main(["train", "demo", "--show", "views.photometric=simclrr"]) == 2
    err = capsys.readouterr().err
    assert "views.photometric" in err and "'simclr'" in err


def test_plugins_key_imports_a_file_that_registers_a_photometric_recipe(tmp_path):
    plugin = tmp_path / "my_recipes.py"
    plugin.write_text(
        "import contrastlab\n\n"
        "@contrastlab.register_photometric('grey_only_plugin_test')\n"
        "def grey(view):\n"
        "    return {'grayscale_prob': 1.0}\n"
    )
    with pytest.raises(ConfigError, match="views.photometric"):
        load_config("demo", ["views.photometric=grey_only_plugin_test"])
    try:
        cfg = load_config("demo", [f"plugins=[{plugin}]", "views.photometric=grey_only_plugin_test"])
        assert cfg.views.photometric == "grey_only_plugin_test" and cfg.plugins == [str(plugin)]
        import_plugin(str(plugin))  # a second import of the same file registers nothing twice
    finally:
        contrastlab.registry.PHOTOMETRICS.unregister("grey_only_plugin_test")


def test_bad_plugins_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("demo", [f"plugins=[{tmp_path / 'missing.py'}]"])
    with pytest.raises(ConfigError, match="cannot import 'no_such_module_xyz'"):
        load_config("demo", ["plugins=[no_such_module_xyz]"])
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ConfigError, match="RuntimeError: boom"):
        load_config("demo", [f"plugins=[{broken}]"])
