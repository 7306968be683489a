import importlib.util
import json
import os

import pyro
import pytest
import torch

# the repository root holds the example and benchmark scripts (the toolkit itself is installed)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# the tests' models are tiny: one thread avoids paying for thread wake-ups on every small op
# (a 3x3 lower-triangular transform takes milliseconds with two threads on a loaded machine)
torch.set_num_threads(1)


@pytest.fixture
def load_main():
    """``load_main("examples/x.py")``: the ``main`` function of a script of the repository."""

    def load(relpath):
        name = os.path.splitext(os.path.basename(relpath))[0]
        spec = importlib.util.spec_from_file_location(f"script_{name}", os.path.join(ROOT, relpath))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.main

    return load


@pytest.fixture
def run_example(load_main, keep_threads):
    """``run_example("examples/x.py", out, *args, figures=("a.png",))``: run a script's ``main``
    with ``args`` and ``--out out --device cpu``; check that its metrics.json holds what it
    returned and that each of ``figures`` was written; return the metrics."""

    def run(script, out, *args, figures=()):
        metrics = load_main(script)([*args, "--out", str(out), "--device", "cpu"])
        with open(out / "metrics.json") as f:
            assert json.load(f) == json.loads(json.dumps(metrics, default=float))
        for name in figures:
            assert (out / name).stat().st_size > 0, name
        return metrics

    return run


@pytest.fixture
def keep_threads():
    """Restore torch's thread count after a script that sets its own (--quick uses one)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def pytest_addoption(parser):
    parser.addoption("--compile-all", action="store_true",
                     help="compile='auto' compiles every fit, however short (vi_toolkit.compiled."
                          "AUTO_MIN_STEPS = 1), in blocks of steps wherever it can (BLOCK_MIN_STEPS "
                          "= 2): the suite's exact-answer tests then check the compiled step, and "
                          "fits it cannot follow fall back with their warning")


@pytest.fixture(autouse=True)
def _compile_all(request, monkeypatch):
    if request.config.getoption("--compile-all"):
        from vi_toolkit import compiled

        monkeypatch.setattr(compiled, "AUTO_MIN_STEPS", 1)
        monkeypatch.setattr(compiled, "BLOCK_MIN_STEPS", 2)


@pytest.fixture(autouse=True)
def _clean_state():
    """Each test starts with an empty parameter store and validation on."""
    pyro.clear_param_store()
    pyro.enable_validation(True)
    yield
    pyro.clear_param_store()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
