import pytest

from graddyn._registry import Registry, UnknownNameError, check_options


def test_unknown_name_lists_valid_names():
    reg = Registry("model")
    reg.register("mlp")(object)
    with pytest.raises(UnknownNameError, match="unknown model 'cnm'; valid names: mlp"):
        reg.get("cnm")


def test_check_options_names_the_unknown_and_the_valid():
    check_options("dataset", "digits", {"standardize": False}, {"standardize": True})
    with pytest.raises(TypeError, match=r"got unknown option\(s\) a, b; valid options: \(none\)"):
        check_options("dataset", "blobs", {"b": 1, "a": 2}, {})


def test_loader_imports_on_first_lookup_only_what_it_needs():
    from graddyn._registry import Registry, suggest

    calls = []
    reg = Registry("thing")

    def loader(name):
        calls.append(name)
        if name == "a":
            reg.register("a")(1)
            return False
        reg.register("b")(2)
        return True  # everything is loaded now

    reg.set_loader(loader)
    assert reg.get("a") == 1 and calls == ["a"]
    assert reg.get("a") == 1 and calls == ["a"]  # known: no second load
    assert reg.names() == ["a", "b"] and calls == ["a", None]
    assert "b" in reg and len(reg) == 2 and calls == ["a", None]
    assert suggest("c", reg.names()) == "" and suggest("bb", ["b", "zz"]) == "; did you mean 'b'?"


def test_experiment_index_matches_the_registry():
    import graddyn.experiments as ex

    index = ex.index()
    assert set(index) | {"smoke"} == set(ex.EXPERIMENTS.names())
    for name, (_module, summary) in index.items():
        assert ex.EXPERIMENTS.get(name).summary() == summary, name
