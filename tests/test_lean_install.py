"""``pip install -e .`` without extras: the core works, and every optional tool names the extra that installs it.

The extras' libraries are installed in the test environment, so a child process hides them first:
``sys.modules[name] = None`` makes ``import name`` raise ModuleNotFoundError and ``importlib.util.find_spec(name)``
(which transformers uses to probe for accelerate) return None, exactly as if the library were absent.
"""

import json
import os
import runpy
import subprocess
import sys
import textwrap
from pathlib import Path
from unittest import mock

import pytest
from conftest import save_tiny_folder

from backpack._optional import OPTIONAL_LIBRARIES

ROOT = Path(__file__).resolve().parents[1]

# Everything the extras bring (train, eval, demo, dev) that the core must do without.
BLOCKED = ("scipy", "matplotlib", "gensim", "gradio", "datasets", "accelerate", "tensorboard", "selenium")
HINT = "pip install 'backpack-gpt2[eval]'"

CHILD = textwrap.dedent(
    """
    import contextlib, importlib, io, json, sys

    folder, workdir, blocked = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
    for name in blocked:
        sys.modules[name] = None
    results = {}
    try:
        import scipy  # noqa: F401
        results["blocking works"] = False
    except ModuleNotFoundError:
        results["blocking works"] = True

    import torch
    import backpack
    from backpack import gpt2_tokenizer
    from backpack.cli import main
    from backpack.topic import generate

    results["similarity module loaded by import"] = "backpack.similarity" in sys.modules
    results["Hello world"] = gpt2_tokenizer().encode("Hello world")
    model, tokenizer = backpack.load_model(folder)
    ids = torch.tensor([tokenizer.encode("The river bank")])
    with torch.no_grad():
        greedy = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                                pad_token_id=tokenizer.eos_token_id)
        sampled = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=True,
                                 top_p=0.9, pad_token_id=tokenizer.eos_token_id)
    results["generated"] = [greedy.shape[1] - ids.shape[1], sampled.shape[1] - ids.shape[1]]
    results["senses"] = len(backpack.read_senses(model, ["bank"], tokenizer, top_k=3).top[0])
    explanation = backpack.explain_prediction(model, "My nurse said that", "he", tokenizer=tokenizer)
    results["explanation gap"] = abs(explanation.total - explanation.value)
    with backpack.scale_sense(model, "nurse", 1, 0.0, tokenizer):
        results["interventions"] = len(backpack.active_interventions(model))
    report = backpack.evaluate_bias(model, tokenizer, 1, ["nurse"], scales=[0.0, 0.5, 1.0], progress=False)
    results["bias"] = report.unmodified
    controller = backpack.TopicController(model, backpack.bag_token_ids(["music"], tokenizer), 2, sample_size=256,
                                          progress=False)
    results["topic tokens"] = generate(model, tokenizer, "My day was", 4, controller, seed=0).new_ids.numel()

    def import_error(call):
        try:
            call()
        except ImportError as error:
            return [type(error).__name__, str(error)]
        return None

    rg65 = workdir + "/rg65.txt"
    with open(rg65, "w") as handle:
        handle.write("gem jewel 3.94\\nboy lad 3.82\\nnoon string 0.04\\n")
    results["similarity, built-in data"] = import_error(lambda: backpack.similarity_table(model, tokenizer))
    results["similarity, own file"] = import_error(lambda: backpack.similarity_table(model, tokenizer, {"RG65": rg65}))
    results["plots"] = import_error(lambda: importlib.import_module("backpack.plots"))
    for name, argv in (("cli --png", ["senses", folder, "bank", "--png", workdir + "/senses.png"]),
                       ("cli similarity", ["similarity", folder])):
        err, out = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            status = main(argv)
        results[name] = [status, err.getvalue(), out.getvalue()]
    results["blocked and loaded"] = [name for name in blocked if sys.modules.get(name) is not None]
    print("RESULTS " + json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_folder(tmp_path_factory.mktemp("lean-model"))


def test_core_works_and_optional_tools_name_their_extra(folder, tmp_path):
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    completed = subprocess.run([sys.executable, "-c", CHILD, folder, str(tmp_path), ",".join(BLOCKED)], cwd=tmp_path,
                               env=environment, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    line = next(l for l in completed.stdout.splitlines() if l.startswith("RESULTS "))
    results = json.loads(line[len("RESULTS "):])

    assert results["blocking works"]
    assert not results["similarity module loaded by import"]
    assert results["Hello world"] == [15496, 995]
    assert results["generated"] == [5, 5]
    assert results["senses"] == 4 and results["interventions"] == 1 and results["topic tokens"] >= 1
    assert results["explanation gap"] < 1e-4 and results["bias"] >= 1.0
    assert results["blocked and loaded"] == []

    for name, missing in (("similarity, built-in data", "gensim"), ("similarity, own file", "scipy"),
                          ("plots", "matplotlib")):
        kind, message = results[name]
        assert kind == "MissingExtraError" and f"`{missing}` package" in message and HINT in message, (name, message)
    status, err, out = results["cli --png"]
    assert status == 1 and "`matplotlib` package" in err and HINT in err and out == ""  # refused before any work
    assert not (tmp_path / "senses.png").exists()
    status, err, out = results["cli similarity"]
    assert status == 1 and "`gensim` package" in err and HINT in err


def setup_arguments() -> dict:
    """The keyword arguments setup.py passes to setuptools.setup (setup.py is run, setup() only recorded)."""
    import setuptools

    captured = {}
    with mock.patch.object(setuptools, "setup", lambda **kwargs: captured.update(kwargs)):
        runpy.run_path(str(ROOT / "setup.py"), run_name="__main__")
    return captured


def requirement_names(requirements) -> set[str]:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    return {canonicalize_name(Requirement(r).name) for r in requirements}


def test_setup_extras_provide_every_optional_library():
    from importlib.metadata import packages_distributions

    from packaging.utils import canonicalize_name

    arguments = setup_arguments()
    extras = {extra: requirement_names(requirements) for extra, requirements in arguments["extras_require"].items()}
    core = requirement_names(arguments["install_requires"])
    providers = packages_distributions()
    for module, extra in OPTIONAL_LIBRARIES.items():
        distributions = {canonicalize_name(d) for d in providers[module]}
        assert distributions & extras[extra], f"extra {extra!r} does not install {module} ({distributions})"
        assert distributions & extras["dev"], f"extra 'dev' does not install {module}"
        assert not distributions & core, f"{module} is optional but in install_requires"
    # The demo draws its figures with backpack.plots, so its extra must bring the plots' library too.
    assert "from backpack import plots" in (ROOT / "demo" / "app.py").read_text()
    assert {canonicalize_name(d) for d in providers["matplotlib"]} & extras["demo"]
