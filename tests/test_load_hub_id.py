"""Loading by Hub id or folder through the package's one loader, without ever running the checkpoint's own code.

Offline: a Hub cache built in the test holds the golden tiny checkpoint under the id ``stanfordnlp/backpack-gpt2``
in the published layout (``model_type: gpt2`` + ``auto_map``, ``pytorch_model.bin`` with the aliases), and code
files that record their import and then raise, as the 2023 code does on transformers 5. A fresh process with
HF_HUB_OFFLINE=1 and HF_HUB_CACHE pointing there loads it by id through every entry point (``backpack.load_model``,
the ``backpack`` command, ``train/evaluate.py``'s loader, the demo's ``main``, ``hub_upload.py``'s reader) and
reports what each produced; the tests compare that with the published implementation's golden outputs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_CHECKPOINT, tiny_model
from hub_cache import CODE_FILES, PUBLISHED_ID, publish_with_stand_in_code, stand_in_code

import backpack
from backpack.loading import ModelLoadError, is_backpack_config, load_model
from backpack.tokenizer import gpt2_tokenizer
from modeling_backpack_gpt2 import BackpackGPT2LMHeadModel

TOLERANCE = 1e-5  # float32 against the published implementation's float64 outputs (relative)
SENSE_WORD_POSITION = 3  # the golden senses of input_ids[0, 3] are what `backpack senses` must print

# Runs in a fresh process (HF_HUB_OFFLINE / HF_HUB_CACHE are read when huggingface_hub is imported) and saves, per
# entry point, the logits on the golden input or its output, plus every module that came from outside the package.
_ENTRY_POINTS_SCRIPT = r"""
import contextlib, io, sys, traceback
import torch

repo_id, expected_path, word_id, result_path = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
input_ids = torch.load(expected_path, weights_only=True)["input_ids"]
results = {}


def record(name, function):
    try:
        results[name] = function()
    except BaseException as error:  # SystemExit included: report it, don't end the process
        results[name] = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}


def describe(model, tokenizer=None):
    with torch.no_grad():
        logits = model(input_ids, use_cache=False).logits
    result = {"class": f"{type(model).__module__}.{type(model).__qualname__}", "logits": logits,
              "training": model.training}
    if tokenizer is not None:
        result.update(vocabulary=len(tokenizer), pad=tokenizer.pad_token)
    return result


def toolkit():
    import backpack

    return describe(*backpack.load_model(repo_id))


def cli():
    from backpack.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(["senses", repo_id, "#" + word_id, "--top", "3", "--no-bottom"])
    return {"status": status, "stdout": out.getvalue(), "stderr": err.getvalue()}


def evaluate():
    from backpack_train.evaluate import load_model_and_tokenizer

    return describe(*load_model_and_tokenizer(repo_id))


def demo():
    import backpack_demo.app as app

    seen = {}
    app.build_app = lambda model, tokenizer, name: seen.update(model=model, tokenizer=tokenizer, name=name) or "app"
    app.launch = lambda app_, host, port, block=False: seen.update(launched=(app_, host, port))
    status = app.main([repo_id, "--port", "7999"])
    return {"status": status, "name": seen.get("name"), "launched": seen.get("launched"),
            **describe(seen["model"], seen["tokenizer"])}


def hub_upload_reader():
    from huggingface_hub import snapshot_download

    from backpack_hub.checkpoint import load_checkpoint

    folder = snapshot_download(repo_id)  # offline: the cached snapshot
    checkpoint = load_checkpoint(folder)  # its tokenizer check refuses GPT-2's for a 512-word model
    return {"kind": checkpoint.kind, **describe(checkpoint.model)}


def not_cached():
    import backpack

    backpack.load_model("stanfordnlp/not-in-the-cache")


record("backpack.load_model", toolkit)
record("backpack senses", cli)
record("train/evaluate.py", evaluate)
record("demo/app.py", demo)
record("hub_upload.load_checkpoint", hub_upload_reader)
record("not cached", not_cached)
cache = sys.argv[5]
results["foreign modules"] = sorted(
    name for name, module in list(sys.modules.items())
    if name.startswith("transformers_modules") or str(getattr(module, "__file__", "") or "").startswith(cache))
torch.save(results, result_path)
"""


@pytest.fixture(scope="module")
def published_cache(tmp_path_factory) -> dict:
    """The Hub cache with the golden checkpoint as ``stanfordnlp/backpack-gpt2`` and the stand-in code's marker."""
    root = tmp_path_factory.mktemp("hub")
    cache, marker = root / "cache", root / "imported-repo-code.txt"
    snapshot = publish_with_stand_in_code(cache, PUBLISHED_ID, TINY_CHECKPOINT, marker)
    return {"cache": cache, "marker": marker, "snapshot": snapshot, "root": root}


@pytest.fixture(scope="module")
def entry_points(published_cache) -> dict:
    """What each entry point produced in a fresh offline process that loaded the published id."""
    root = published_cache["root"]
    input_ids = torch.load(TINY_CHECKPOINT / "expected.pt", weights_only=True)["input_ids"]
    word_id = str(int(input_ids[0, SENSE_WORD_POSITION]))
    result_path = root / "results.pt"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(published_cache["cache"]),
               HF_MODULES_CACHE=str(root / "modules"), PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false")
    env.pop("TRANSFORMERS_OFFLINE", None)  # HF_HUB_OFFLINE alone must do
    command = [sys.executable, "-c", _ENTRY_POINTS_SCRIPT, PUBLISHED_ID, str(TINY_CHECKPOINT / "expected.pt"),
               word_id, str(result_path), str(published_cache["cache"])]
    process = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert process.returncode == 0 and result_path.is_file(), process.stderr[-4000:]
    return torch.load(result_path, weights_only=False)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected).norm() / expected.norm())


def logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids, use_cache=False).logits


# --- by Hub id, offline, through every entry point ---------------------------------------------------------------


@pytest.mark.parametrize("entry_point", ["backpack.load_model", "train/evaluate.py", "demo/app.py",
                                         "hub_upload.load_checkpoint"])
def test_entry_point_loads_the_published_id_with_the_installed_class_and_golden_logits(entry_points, expected,
                                                                                        entry_point):
    result = entry_points[entry_point]
    assert "error" not in result, result.get("traceback")
    assert result["class"] == "modeling_backpack_gpt2.BackpackGPT2LMHeadModel"  # the installed module
    assert relative_error(result["logits"], expected["logits"]) <= TOLERANCE
    assert result["training"] is False
    if entry_point == "hub_upload.load_checkpoint":
        assert result["kind"] == "export"
    else:  # the repo has no tokenizer: GPT-2's, built offline, with EOS as the pad token
        assert result["vocabulary"] == 50257 and result["pad"] == "<|endoftext|>"


def test_demo_serves_the_model_it_loaded_by_id(entry_points):
    result = entry_points["demo/app.py"]
    assert result["status"] == 0 and result["name"] == PUBLISHED_ID
    assert result["launched"] == ("app", "127.0.0.1", 7999)


def test_backpack_senses_command_by_id_prints_the_golden_senses(entry_points, expected):
    result = entry_points["backpack senses"]
    assert "error" not in result, result.get("traceback")
    assert result["status"] == 0, result["stderr"]
    word_id = int(expected["input_ids"][0, SENSE_WORD_POSITION])
    senses = expected["senses"][0, :, SENSE_WORD_POSITION]  # (senses, dim): C(x) of the published implementation
    embeddings = torch.load(TINY_CHECKPOINT / "pytorch_model.bin", weights_only=True)["lm_head.weight"].double()
    sense_logits = senses @ embeddings.T  # E·C(x)[l]
    tokenizer = gpt2_tokenizer()
    lines = result["stdout"].splitlines()
    assert lines[0].startswith(f"word {word_id!r}  token ids [{word_id}]")
    rows = lines[2:]
    assert len(rows) == senses.shape[0]
    for sense, row in enumerate(rows):
        values, ids = sense_logits[sense].topk(3)
        top = ", ".join(f"{tokenizer.decode([int(i)])!r} {float(v):+.2f}" for v, i in zip(values, ids))
        assert row == f"  {sense:>5}  {float(senses[sense].norm()):7.2f}  {top}"


def test_no_entry_point_imported_the_repos_code(entry_points, published_cache):
    assert not published_cache["marker"].exists(), published_cache["marker"].read_text()
    assert entry_points["foreign modules"] == []
    assert not (published_cache["root"] / "modules").exists()  # transformers never copied the repo's code


def test_an_id_that_is_not_cached_while_offline_names_the_id_and_hf_hub_offline(entry_points, published_cache):
    error = entry_points["not cached"]["error"]
    assert error.startswith("ModelLoadError: 'stanfordnlp/not-in-the-cache' is not a local folder")
    assert "HF_HUB_OFFLINE" in error and str(published_cache["cache"]) in error


def test_the_stand_ins_do_fail_when_the_repos_code_is_run(published_cache, tmp_path):
    """The control: loading the same snapshot the README's old way runs the repo's code, and that fails."""
    from transformers import AutoModelForCausalLM

    marker = tmp_path / "marker.txt"
    folder = tmp_path / "snapshot"
    shutil.copytree(published_cache["snapshot"], folder)  # follows the blob links
    for name in CODE_FILES:
        (folder / name).write_bytes(stand_in_code(marker, name))
    with pytest.raises(AttributeError, match="all_tied_weights_keys"):
        AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    assert marker.read_text().split() == ["configuration_backpack_gpt2.py"]
    # The same folder through the package's loader: no import, golden model.
    model, _ = load_model(folder)
    assert type(model) is BackpackGPT2LMHeadModel
    assert marker.read_text().split() == ["configuration_backpack_gpt2.py"]


# --- local folders -----------------------------------------------------------------------------------------------


def test_golden_folder_loads_with_the_installed_class_in_float64(expected):
    model, tokenizer = backpack.load_model(TINY_CHECKPOINT, dtype=torch.float64)
    assert type(model) is BackpackGPT2LMHeadModel and not model.training
    assert model.lm_head.weight.dtype == torch.float64
    assert relative_error(logits(model, expected["input_ids"]), expected["logits"]) <= 1e-12
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.model_max_length == model.config.n_positions == 64


def test_saved_folder_round_trips_and_its_own_tokenizer_is_used(tmp_path):
    model = tiny_model(seed=4)
    model.save_pretrained(tmp_path)
    own = gpt2_tokenizer(model_max_length=48, padding_side="right")
    own.pad_token = None
    own.save_pretrained(tmp_path)
    loaded, tokenizer = load_model(tmp_path)
    assert type(loaded) is BackpackGPT2LMHeadModel
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    assert tokenizer.model_max_length == 48 and tokenizer.padding_side == "right"  # the folder's, not GPT-2's default
    assert tokenizer.pad_token == "<|endoftext|>"  # set to EOS because the folder's had none


def test_gpt2_baseline_folder_loads_with_the_auto_class(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    baseline = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=96, n_positions=16,
                                          bos_token_id=0, eos_token_id=0)).eval()
    baseline.save_pretrained(tmp_path)
    model, tokenizer = load_model(tmp_path)
    assert type(model) is GPT2LMHeadModel
    ids = torch.tensor([[1, 5, 7, 9]])
    assert torch.equal(logits(model, ids), logits(baseline, ids))
    assert len(tokenizer) == 50257
    with pytest.raises(ModelLoadError, match="is not a Backpack GPT-2 configuration"):
        load_model(tmp_path, require_backpack=True)


def test_unknown_model_type_with_remote_code_is_refused_without_importing_it(tmp_path):
    marker = tmp_path / "marker.txt"
    tiny_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(model_type="mystery-lm", architectures=["MysteryForCausalLM"],
                  auto_map={"AutoConfig": "configuration_mystery.MysteryConfig",
                            "AutoModelForCausalLM": "modeling_mystery.MysteryForCausalLM"})
    (tmp_path / "config.json").write_text(json.dumps(config))
    for name in ("configuration_mystery.py", "modeling_mystery.py"):
        (tmp_path / name).write_bytes(stand_in_code(marker, name))
    with pytest.raises(ModelLoadError, match="without running its own code"):
        load_model(tmp_path)
    assert not marker.exists()


# --- refused folders ---------------------------------------------------------------------------------------------


def _golden_copy(tmp_path: Path, **config_changes) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(TINY_CHECKPOINT, folder)
    folder.chmod(0o755)
    config = json.loads((folder / "config.json").read_text())
    config.update(config_changes)
    (folder / "config.json").unlink()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_config_with_more_layers_than_the_weights_names_the_missing_weights(tmp_path):
    folder = _golden_copy(tmp_path, n_layer=3)  # weights for 2
    with pytest.raises(ModelLoadError, match=r"do not fit its config.json: missing backpack\.gpt2_model\.h\.2\."):
        load_model(folder)


def test_config_with_fewer_layers_than_the_weights_names_the_unexpected_weights(tmp_path):
    folder = _golden_copy(tmp_path, n_layer=1)  # a silently shallower model otherwise
    with pytest.raises(ModelLoadError, match=r"unexpected backpack\.gpt2_model\.h\.1\."):
        load_model(folder)


def test_weights_of_the_wrong_shape_are_named_with_both_shapes(tmp_path):
    folder = _golden_copy(tmp_path, num_senses=8)  # the sense network's output is 4 x 64 wide
    with pytest.raises(ModelLoadError, match=r"wrong shape backpack\.sense_network\.final_mlp\.c_proj\.bias "
                                             r"\(checkpoint \(256,\) vs config \(512,\)\)"):
        load_model(folder)


def test_missing_weight_in_the_file_is_named(tmp_path):
    folder = _golden_copy(tmp_path)
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    del state["backpack.sense_network.ln.weight"]
    (folder / "pytorch_model.bin").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=r"missing backpack\.sense_network\.ln\.weight$"):
        load_model(folder)


# --- broken checkpoints are refused before they are used ----------------------------------------------------------


def test_an_integer_weight_in_the_published_layout_is_refused_by_id_naming_file_and_tensor(tmp_path, monkeypatch):
    from huggingface_hub import constants

    folder = _golden_copy(tmp_path / "source")
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    state["backpack.sense_weight_net.c_attn.weight"] = state["backpack.sense_weight_net.c_attn.weight"].long()
    (folder / "pytorch_model.bin").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    snapshot = publish_with_stand_in_code(tmp_path / "cache", "someone/int-weights", folder, tmp_path / "marker")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelLoadError, match=rf"{snapshot}/pytorch_model\.bin: tensor "
                                             r"backpack\.sense_weight_net\.c_attn\.weight is stored as int64; "
                                             "weights must be floating point"):
        load_model("someone/int-weights")  # from_pretrained would cast it to float32 silently
    assert not (tmp_path / "marker").exists()


def test_parameter_estimate_is_exact_for_backpack_and_gpt2_layouts():
    from transformers import GPT2Config, GPT2LMHeadModel

    from backpack.loading import estimate_parameters
    from configuration_backpack_gpt2 import BackpackGPT2Config

    configs = [(BackpackGPT2Config.from_size("micro"), BackpackGPT2LMHeadModel),
               (BackpackGPT2Config(n_embd=48, n_layer=3, n_head=4, num_senses=6, sense_intermediate_scale=2,
                                   n_inner=100, vocab_size=300, n_positions=40), BackpackGPT2LMHeadModel),
               (GPT2Config(n_embd=64, n_layer=3, n_head=4, vocab_size=500, bos_token_id=0, eos_token_id=0),
                GPT2LMHeadModel)]
    for config, model_class in configs:
        with torch.device("meta"):  # shapes only: nothing is allocated
            model = model_class(config)
        unique = {id(parameter): parameter for parameter in model.parameters()}.values()
        assert estimate_parameters(config.to_dict()) == sum(parameter.numel() for parameter in unique)


def test_a_model_too_large_for_the_memory_is_refused_before_anything_is_allocated(tmp_path, monkeypatch):
    import backpack.loading
    from modeling_backpack_gpt2 import BackpackGPT2LMHeadModel

    folder = _golden_copy(tmp_path)
    monkeypatch.setattr(backpack.loading, "available_memory", lambda: 1_000_000)  # 1 MB free
    monkeypatch.setattr(BackpackGPT2LMHeadModel, "from_pretrained",
                        classmethod(lambda *args, **kwargs: pytest.fail("the model was built")))
    with pytest.raises(ModelLoadError, match=rf"{folder}/config.json: these sizes \(vocab_size 512, n_embd 64, "
                                             r"n_layer 2.*make about [\d,]+ parameters, [\d.]+ MB in float32, more "
                                             r"than the 1 MB of memory available"):
        load_model(folder)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda tmp: tmp / "nowhere" / "model", "model folder '{path}' does not exist"),
        (lambda tmp: tmp, "model folder '{path}' has no config.json"),
        (lambda tmp: _golden_copy(tmp) / "config.json", "'{path}' is a file; give the model folder"),
    ],
    ids=["missing path", "no config", "a file"],
)
def test_bad_paths_are_clear_errors(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(ModelLoadError) as error:
        load_model(path)
    assert message.format(path=path) in str(error.value)


def test_folder_without_weights_says_so(tmp_path):
    folder = _golden_copy(tmp_path)
    (folder / "pytorch_model.bin").unlink()
    with pytest.raises(ModelLoadError, match="has a config.json but no weights"):
        load_model(folder)


def test_trainer_checkpoint_folder_points_at_its_export(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match=f"the trainer's export inside it is {tmp_path / 'model'}"):
        load_model(tmp_path)


def test_the_command_line_reports_a_missing_folder(tmp_path, capsys):
    from backpack.cli import main

    assert main(["senses", str(tmp_path / "nowhere"), "bank"]) == 2
    assert "does not exist" in capsys.readouterr().err


# --- which configurations are Backpacks --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, backpack",
    [
        ({"model_type": "backpack-gpt2"}, True),
        ({"model_type": "gpt2", "architectures": ["BackpackGPT2LMHeadModel"]}, True),
        ({"model_type": "gpt2", "auto_map": {"AutoModelForCausalLM": "modeling_backpack_gpt2.BackpackGPT2LMHeadModel"}},
         True),
        ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, False),
        ({"model_type": "gpt2", "num_senses": 16}, False),  # a key alone does not name the classes
        ({"model_type": "llama", "architectures": ["BackpackGPT2LMHeadModel"]}, False),
    ],
)
def test_is_backpack_config(config, backpack):
    assert is_backpack_config(config) is backpack


def test_the_published_config_is_a_backpack():
    from conftest import REFERENCE

    assert is_backpack_config(json.loads((REFERENCE / "config.json").read_text()))
