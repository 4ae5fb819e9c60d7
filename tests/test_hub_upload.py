"""hub_upload.py: staging folder, model card, fresh-process validation, and the push as one HfApi commit.

The Hub is unreachable here, so pushes are intercepted at the HfApi method level (asserting on what would be sent)
and, for authentication / permission / network failures, at the HTTP level: huggingface_hub's own client runs
against a mock transport, so the errors are the ones it really raises.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, ModelCard
from huggingface_hub import errors as hub_errors
from huggingface_hub.hf_api import CommitInfo, RepoUrl
from huggingface_hub.utils import _http as hub_http_module

import hub_upload
from backpack.tokenizer import gpt2_tokenizer
from modeling_backpack_gpt2 import BackpackGPT2LMHeadModel

REPO_ID = "someone/backpack-tiny"
EOS = 50256
RUN_ARGS = dict(
    dataset=None, data_files=None, model="backpack", n_embd=32, n_layer=2, n_head=2, n_positions=32, num_senses=4,
    sense_intermediate_scale=4, vocab_size=50264, dropout=0.0, max_steps=200, learning_rate=6e-4, warmup_steps=20,
    lr_scheduler="linear", weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0,
    tokens_per_step=4096, batch_size=8, gradient_accumulation_steps=None, seed=1111, mixed_precision="bf16",
)
RUN_METRICS = dict(
    start_step=0, start_val_loss=10.83, start_val_perplexity=50601.2, train_loss=6.12, step=200, tokens=819_200,
    val_loss=6.3012, val_perplexity=544.93, train_seconds=300.5, tokens_per_second=2726.0, stopped_by=None,
    wall_seconds=320.2,
)
MODEL_FILES = {"config.json", "configuration_backpack_gpt2.py", "modeling_backpack_gpt2.py", "generation_config.json",
               "tokenizer.json", "tokenizer_config.json", "README.md"}


def _model(seed: int = 0) -> BackpackGPT2LMHeadModel:
    """The tiny Backpack with GPT-2's vocabulary size, set up the way the trainer sets up its model."""
    model = tiny_model(seed, vocab_size=50264, n_positions=32, bos_token_id=EOS, eos_token_id=EOS, pad_token_id=EOS)
    model.generation_config.pad_token_id = EOS
    model.generation_config.max_length = 32
    return model


def export_like_trainer(model: BackpackGPT2LMHeadModel, folder: Path, metrics: dict | None = None) -> Path:
    """What train/export.py writes: save_pretrained + tokenizer + training_args.json."""
    model.save_pretrained(folder)
    gpt2_tokenizer(model_max_length=32).save_pretrained(folder)
    record = {"training_args": RUN_ARGS, "metrics": RUN_METRICS if metrics is None else metrics}
    (folder / "training_args.json").write_text(json.dumps(record, indent=2))
    return folder


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.tensor([[464, 5157, 8002, 3303, 2746, 262]])
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    return export_like_trainer(_model(), tmp_path_factory.mktemp("run") / "model")


@pytest.fixture(scope="module")
def dry_run(export, tmp_path_factory) -> tuple[int, str, Path]:
    """The CLI's --dry-run on the export (stages and validates in a fresh process): exit code, output, staging."""
    staging = tmp_path_factory.mktemp("dry") / "staging"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = hub_upload.main([str(export), "--repo-id", REPO_ID, "--dry-run", "--staging-dir", str(staging)])
    return code, out.getvalue(), staging


# --- staging, validation, card --------------------------------------------------------------------------------


def test_dry_run_stages_exactly_the_repo_files_and_lists_them_with_sizes(dry_run):
    code, output, staging = dry_run
    assert code == 0, output
    files = {p.name for p in staging.iterdir()}
    assert files == MODEL_FILES | {"model.safetensors"}  # the run's training_args.json stays local
    listing = output[output.index("[4/4]"):]
    for name in files:
        size = hub_upload._human_size((staging / name).stat().st_size)
        assert any(line.split() == [name, *size.split()] for line in listing.splitlines()), (name, size, listing)
    assert f"{len(files)} files" in listing


def test_staging_loads_with_remote_code_in_a_fresh_process_with_equal_logits_and_generates(dry_run):
    code, output, _ = dry_run
    assert code == 0, output
    line = next(line for line in output.splitlines() if line.strip().startswith("ok in"))
    assert "loaded as transformers_modules." in line  # the folder's own code, not the installed module
    assert "logits identical to the checkpoint's (max |diff| 0.0e+00)" in line
    assert f"pipeline: '{hub_upload.VALIDATION_PROMPT}" in line


def test_staged_code_is_the_installed_package_and_config_points_at_it(dry_run, export):
    _, _, staging = dry_run
    for module in hub_upload.CODE_MODULES:
        name = Path(module.__file__).name
        assert (staging / name).read_bytes() == Path(module.__file__).read_bytes()
    config = json.loads((staging / "config.json").read_text())
    assert config["architectures"] == ["BackpackGPT2LMHeadModel"]
    assert config["auto_map"] == {"AutoConfig": "configuration_backpack_gpt2.BackpackGPT2Config",
                                  "AutoModelForCausalLM": "modeling_backpack_gpt2.BackpackGPT2LMHeadModel"}
    assert json.loads((staging / "generation_config.json").read_text())["max_length"] == 32
    assert torch.equal(_logits(BackpackGPT2LMHeadModel.from_pretrained(staging)),
                       _logits(BackpackGPT2LMHeadModel.from_pretrained(export)))


def test_model_card_metadata_parses_and_carries_the_run(dry_run):
    _, _, staging = dry_run
    card = ModelCard.load(staging / "README.md")
    data = card.data
    assert data.license == "apache-2.0" and data.library_name == "transformers"
    assert data.pipeline_tag == "text-generation" and data.language == "en"
    assert {"backpack", "custom_code"} <= set(data.tags)
    results = {r.metric_type: r for r in data.eval_results}
    assert results["perplexity"].metric_value == pytest.approx(544.93)
    assert results["loss"].metric_value == pytest.approx(6.3012)
    assert results["perplexity"].dataset_split == "validation" and results["perplexity"].task_type == "text-generation"
    assert data.to_dict()["model-index"][0]["name"] == "backpack-tiny"
    text = card.text
    for section in ("## How to use", "### Generate", "### Read the senses of a word", "## Training details",
                    "## Evaluation", "## Limitations", "## Citation"):
        assert section in text
    assert f'from_pretrained("{REPO_ID}", trust_remote_code=True)' in text
    assert 'pipeline("text-generation"' in text and "sense_logits" in text
    for fact in ("200 of 200 scheduled", "819,200", "4,096 tokens per optimizer step", "peak learning rate 0.0006",
                 "20 warm-up steps", "`bf16`", "5m 20s", "544.93", "50601.20", "1,666,336"):
        assert fact in text, fact
    assert "@inproceedings{hewitt-etal-2023-backpack" in text and "Backpack Language Models" in text


def test_existing_card_keeps_its_text_and_gets_its_metadata_updated(export, tmp_path):
    folder = tmp_path / "model"
    for path in export.iterdir():
        (folder / path.name).parent.mkdir(exist_ok=True)
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "README.md").write_text("---\nlicense: mit\ntags:\n- mine\n---\n\n# My notes\n\nHand-written.\n")
    checkpoint = hub_upload.load_checkpoint(folder)
    card = hub_upload.build_model_card(checkpoint, REPO_ID)
    card.save(tmp_path / "README.md")
    reloaded = ModelCard.load(tmp_path / "README.md")
    assert "# My notes\n\nHand-written." in reloaded.text and "## Training details" not in reloaded.text
    assert reloaded.data.license == "mit"  # the author's choice is kept
    assert reloaded.data.tags[0] == "mine" and "backpack" in reloaded.data.tags
    assert reloaded.data.library_name == "transformers" and reloaded.data.pipeline_tag == "text-generation"
    assert reloaded.data.eval_results[0].metric_value == pytest.approx(544.93)


def test_sharding_above_the_limit_writes_an_index_that_loads(export, tmp_path):
    checkpoint = hub_upload.load_checkpoint(export)
    files = hub_upload.stage(checkpoint, tmp_path / "staging", REPO_ID, max_shard_size="2MB")
    names = {f.path for f in files}
    shards = sorted(n for n in names if n.startswith("model-") and n.endswith(".safetensors"))
    assert len(shards) >= 2 and "model.safetensors" not in names
    assert names == MODEL_FILES | set(shards) | {"model.safetensors.index.json"}
    index = json.loads((tmp_path / "staging" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    loaded = BackpackGPT2LMHeadModel.from_pretrained(tmp_path / "staging")
    assert torch.equal(_logits(loaded), _logits(checkpoint.model))


def test_export_with_missing_weights_is_refused_not_published_half_random(export, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "model"
    folder.mkdir()
    for path in export.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    state = load_file(export / "model.safetensors")
    state.pop("backpack.sense_network.ln.weight")
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    assert hub_upload.main([str(folder), "--repo-id", REPO_ID, "--dry-run"]) == 3
    assert "missing backpack.sense_network.ln.weight" in capsys.readouterr().err


def test_a_gpt2_baseline_export_is_refused(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=64, n_positions=16)).save_pretrained(tmp_path)
    assert hub_upload.main([str(tmp_path), "--repo-id", REPO_ID, "--dry-run"]) == 3
    assert "not a Backpack GPT-2 configuration" in capsys.readouterr().err


# --- accelerate checkpoints ------------------------------------------------------------------------------------


class _TrainingState:
    """What train/checkpointing.py registers for checkpointing."""

    def __init__(self, step: int, tokens: int):
        self.values = {"step": step, "micro_batches": step * 2, "tokens": tokens, "sequences_per_step": 8}

    def state_dict(self) -> dict:
        return self.values


def accelerate_checkpoint(model: BackpackGPT2LMHeadModel, folder: Path, step: int) -> Path:
    """A ``save_state`` folder as Accelerate writes it (tied aliases dropped from model.safetensors)."""
    from accelerate import checkpointing

    folder.mkdir(parents=True)
    optimizer = torch.optim.AdamW(model.parameters())
    checkpointing.save_accelerator_state(str(folder), [model.state_dict()], [optimizer], [], [], 0, step)
    checkpointing.save_custom_state(_TrainingState(step, step * 4096), str(folder), 0)
    return folder


def test_accelerate_checkpoint_is_rebuilt_from_the_runs_export(tmp_path):
    run = tmp_path / "run"
    export_like_trainer(_model(seed=1), run / "model")  # the final export: another step's weights
    trained = _model(seed=2)
    checkpoint_dir = accelerate_checkpoint(trained, run / "checkpoints" / "checkpoint_0", step=100)
    assert "config.json" not in {p.name for p in checkpoint_dir.iterdir()}
    checkpoint = hub_upload.load_checkpoint(checkpoint_dir)
    assert checkpoint.kind == "accelerate" and checkpoint.export_dir == run / "model"
    assert torch.equal(_logits(checkpoint.model), _logits(trained))
    assert checkpoint.step == 100 and checkpoint.tokens == 409_600
    assert checkpoint.metrics == {}  # the final export's metrics describe step 200, not these weights
    card = hub_upload.build_model_card(checkpoint, REPO_ID).content
    assert "100 of 200 scheduled" in card and "No evaluation was recorded" in card and "model-index" not in card


def test_accelerate_checkpoint_with_only_the_run_json(tmp_path):
    run = tmp_path / "run"
    trained = _model(seed=3)
    checkpoint_dir = accelerate_checkpoint(trained, run / "checkpoints" / "checkpoint_4", step=200)
    (checkpoint_dir / "model").mkdir()
    (checkpoint_dir / "model" / "training_args.json").write_text(
        json.dumps({"training_args": RUN_ARGS, "metrics": RUN_METRICS}))
    checkpoint = hub_upload.load_checkpoint(checkpoint_dir)
    assert checkpoint.export_dir is None and checkpoint.model.config.num_senses == 4
    assert torch.equal(_logits(checkpoint.model), _logits(trained))
    assert checkpoint.metrics["val_perplexity"] == pytest.approx(544.93)  # exported with these weights
    assert checkpoint.model.generation_config.max_length == 32


def test_accelerate_checkpoint_without_any_configuration_names_what_is_missing(tmp_path):
    checkpoint_dir = accelerate_checkpoint(_model(), tmp_path / "run" / "checkpoints" / "checkpoint_0", step=1)
    with pytest.raises(hub_upload.CheckpointError, match="no config.json or training_args.json") as error:
        hub_upload.load_checkpoint(checkpoint_dir)
    assert str(checkpoint_dir / "model") in str(error.value)
    assert hub_upload.main([str(checkpoint_dir), "--repo-id", REPO_ID, "--dry-run"]) == 3


def test_not_a_checkpoint_points_at_the_export(export, tmp_path, capsys):
    assert hub_upload.main([str(export.parent), "--repo-id", REPO_ID, "--dry-run"]) == 3
    assert f"the run's export is {export}" in capsys.readouterr().err


# --- the push, intercepted at the HfApi boundary -----------------------------------------------------------------


class FakeHub:
    """Records what HfApi would send; answers like the Hub for a writable user ``someone``."""

    def __init__(self, remote_files: list[str] | None = None, existing_public: bool = False):
        self.calls: list[tuple[str, dict]] = []
        self.remote_files = remote_files or [".gitattributes"]
        self.existing_public = existing_public
        self.commits: list[dict] = []

    def install(self, monkeypatch) -> FakeHub:
        fake = self

        def whoami(api, token=None, **kwargs):
            fake.calls.append(("whoami", {"token": token}))
            return {"type": "user", "name": "someone", "orgs": [{"name": "lab"}],
                    "auth": {"accessToken": {"displayName": "ci", "role": "write"}}}

        def create_repo(api, repo_id, **kwargs):
            fake.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
            return RepoUrl(f"https://huggingface.co/{repo_id}")

        def repo_info(api, repo_id, **kwargs):
            fake.calls.append(("repo_info", {"repo_id": repo_id, **kwargs}))
            return type("Info", (), {"private": not fake.existing_public})()

        def create_branch(api, repo_id, **kwargs):
            fake.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

        def list_repo_files(api, repo_id, **kwargs):
            fake.calls.append(("list_repo_files", {"repo_id": repo_id, **kwargs}))
            return list(fake.remote_files)

        def create_commit(api, repo_id, operations, **kwargs):
            operations = list(operations)
            added = {op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations
                     if isinstance(op, CommitOperationAdd)}
            deleted = [op.path_in_repo for op in operations if isinstance(op, CommitOperationDelete)]
            fake.commits.append({"repo_id": repo_id, "added": added, "deleted": deleted, **kwargs})
            fake.calls.append(("create_commit", {"repo_id": repo_id, **kwargs}))
            return CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/abc123", commit_message="m",
                              commit_description="", oid="abc123")

        for name, function in dict(whoami=whoami, create_repo=create_repo, repo_info=repo_info,
                                   create_branch=create_branch, list_repo_files=list_repo_files,
                                   create_commit=create_commit, upload_folder=None, upload_file=None).items():
            if function is None:  # anything that would commit in pieces must not be called
                def function(*args, _name=name, **kwargs):
                    raise AssertionError(f"{_name} called: the push must be one create_commit")
            monkeypatch.setattr(HfApi, name, function)
        return self

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


def test_push_is_one_commit_of_the_staged_files_to_the_right_repo_branch_and_privacy(export, monkeypatch, capsys):
    hub = FakeHub(remote_files=[".gitattributes", "model-00001-of-00002.safetensors", "pytorch_model.bin",
                                "notes.md"]).install(monkeypatch)
    code = hub_upload.main([str(export), "--repo-id", REPO_ID, "--revision", "step-200", "--private",
                            "--token", "hf_test", "--max-shard-size", "2MB", "--commit-message", "Nano at step 200"])
    output = capsys.readouterr()
    assert code == 0, output.err
    assert hub.names() == ["whoami", "create_repo", "repo_info", "create_branch", "list_repo_files", "create_commit"]
    calls = dict(hub.calls)
    assert calls["create_repo"] == {"repo_id": REPO_ID, "token": "hf_test", "private": True, "repo_type": "model",
                                    "exist_ok": True}
    assert calls["create_branch"]["branch"] == "step-200" and calls["create_branch"]["exist_ok"] is True
    assert calls["list_repo_files"]["revision"] == "step-200"

    [commit] = hub.commits
    assert commit["repo_id"] == REPO_ID and commit["revision"] == "step-200" and commit["token"] == "hf_test"
    assert commit["commit_message"] == "Nano at step 200" and "logits identical" in commit["commit_description"]
    shards = {name for name in commit["added"] if name.startswith("model-")}
    assert len(shards) >= 2
    assert set(commit["added"]) == MODEL_FILES | shards | {"model.safetensors.index.json"}
    # The old checkpoint's weights go in the same commit; unrelated files stay.
    assert sorted(commit["deleted"]) == ["pytorch_model.bin"]  # model-00001-of-00002... is overwritten by a new shard
    assert json.loads(commit["added"]["config.json"])["auto_map"]["AutoModelForCausalLM"].endswith(
        "BackpackGPT2LMHeadModel")
    card = ModelCard(commit["added"]["README.md"].decode())
    assert card.data.eval_results[0].metric_value == pytest.approx(544.93)
    assert 'revision="step-200"' in card.text
    assert "https://huggingface.co/someone/backpack-tiny/commit/abc123" in output.out


def test_push_to_main_public_by_default_and_returns_the_commit_url(export, monkeypatch):
    hub = FakeHub().install(monkeypatch)
    monkeypatch.setattr(hub_upload, "validate_staging", _passing_validation)
    lines: list[str] = []
    url = hub_upload.push_checkpoint(export, f"https://huggingface.co/{REPO_ID}", token="hf_test", log=lines.append)
    assert url == f"https://huggingface.co/{REPO_ID}/commit/abc123"
    assert hub.names() == ["whoami", "create_repo", "list_repo_files", "create_commit"]  # no branch, no visibility
    calls = dict(hub.calls)
    assert calls["create_repo"]["private"] is False and calls["create_repo"]["repo_id"] == REPO_ID
    [commit] = hub.commits
    assert commit["revision"] is None and commit["deleted"] == []
    assert commit["commit_message"] == "Upload Backpack GPT-2 at step 200 with hub_upload.py"
    assert set(commit["added"]) == MODEL_FILES | {"model.safetensors"}


def test_failed_validation_pushes_nothing(export, monkeypatch, capsys):
    hub = FakeHub().install(monkeypatch)
    real_reference = hub_upload.reference_batch

    def wrong_reference(model, tokenizer):  # as if the staged folder computed something else than the checkpoint
        reference = real_reference(model, tokenizer)
        reference["logits"] = reference["logits"] + 1e-3
        return reference

    monkeypatch.setattr(hub_upload, "reference_batch", wrong_reference)
    code = hub_upload.main([str(export), "--repo-id", REPO_ID, "--token", "hf_test"])
    assert code == 4
    err = capsys.readouterr().err
    assert "validation failed, nothing was pushed" in err and "logits differ from the checkpoint's" in err
    assert hub.names() == ["whoami"]  # the token check only: no repo, no branch, no commit


def test_existing_public_repo_is_not_pushed_to_when_private_was_asked(export, monkeypatch, capsys):
    hub = FakeHub(existing_public=True).install(monkeypatch)
    monkeypatch.setattr(hub_upload, "validate_staging", _passing_validation)
    assert hub_upload.main([str(export), "--repo-id", REPO_ID, "--private", "--token", "hf_test"]) == 7
    assert "already exists and is public" in capsys.readouterr().err
    assert "create_commit" not in hub.names()


def test_dataset_or_space_repo_ids_are_refused(export, capsys):
    assert hub_upload.main([str(export), "--repo-id", "datasets/someone/x", "--dry-run"]) == 7
    assert "is a dataset repo" in capsys.readouterr().err
    assert hub_upload.main([str(export), "--repo-id", "no-owner", "--dry-run"]) == 2


def test_missing_token_is_a_clear_error_before_any_work(export, monkeypatch, capsys):
    monkeypatch.setattr(hub_upload, "get_token", lambda: None)
    monkeypatch.setattr(hub_upload, "load_checkpoint", _must_not_run)
    assert hub_upload.main([str(export), "--repo-id", REPO_ID]) == 5
    err = capsys.readouterr().err
    assert "no Hugging Face token" in err and "hf auth login" in err and "HF_TOKEN" in err


def test_read_only_token_is_refused(export, monkeypatch, capsys):
    FakeHub().install(monkeypatch)
    monkeypatch.setattr(HfApi, "whoami", lambda api, token=None, **kw: {
        "type": "user", "name": "someone", "orgs": [], "auth": {"accessToken": {"displayName": "ro", "role": "read"}}})
    monkeypatch.setattr(hub_upload, "load_checkpoint", _must_not_run)
    assert hub_upload.main([str(export), "--repo-id", REPO_ID, "--token", "hf_ro"]) == 6
    assert "read-only" in capsys.readouterr().err


# --- HTTP-level failures: huggingface_hub's real client against a mock transport --------------------------------


def _must_not_run(*args, **kwargs):
    raise AssertionError("this step must not run")


def _passing_validation(staging, reference, **kwargs):
    return hub_upload.ValidationReport("transformers_modules.x.BackpackGPT2LMHeadModel", True, 0.0, "p", "p q", 0.0)


@pytest.fixture
def hub_http(monkeypatch):
    """Route huggingface_hub's HTTP client to ``handler(request) -> response``; records every request."""
    # huggingface_hub 1.x speaks httpx, 2.x httpx2: take whichever its errors are built on.
    httpx = importlib.import_module(hub_errors.Response.__module__.split(".")[0])
    requests: list = []
    state = {"handler": None}

    def transport(request):
        if request.url.path != "/api/agent-harnesses":  # huggingface_hub's own user-agent registry, not ours
            requests.append(request)
        return state["handler"](request, httpx)

    monkeypatch.setattr(hub_http_module, "_GLOBAL_CLIENT", None)
    monkeypatch.setattr(hub_upload, "_API", None)  # no whoami answer cached by another test
    previous = hub_http_module._GLOBAL_CLIENT_FACTORY
    hub_http_module.set_client_factory(lambda: httpx.Client(transport=httpx.MockTransport(transport)))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    yield state, requests, httpx
    hub_http_module.set_client_factory(previous)


def test_http_401_on_the_token_check_gives_the_clear_message(export, hub_http, monkeypatch, capsys):
    state, requests, httpx = hub_http
    state["handler"] = lambda request, httpx: httpx.Response(
        401, json={"error": "Invalid credentials in Authorization header"}, request=request)
    monkeypatch.setattr(hub_upload, "load_checkpoint", _must_not_run)
    assert hub_upload.main([str(export), "--repo-id", REPO_ID, "--token", "hf_expired"]) == 5
    err = capsys.readouterr().err
    assert "rejected the token (401" in err and "https://huggingface.co/settings/tokens" in err
    assert [r.url.path for r in requests] == ["/api/whoami-v2"]
    assert requests[0].headers["authorization"] == "Bearer hf_expired"


def test_http_403_on_repo_creation_gives_the_clear_message_and_pushes_nothing(export, hub_http, monkeypatch, capsys):
    state, requests, httpx = hub_http

    def handler(request, httpx):
        if request.url.path == "/api/whoami-v2":
            return httpx.Response(200, json={"type": "user", "name": "someone", "orgs": [{"name": "lab"}],
                                             "auth": {"accessToken": {"role": "fineGrained"}}}, request=request)
        return httpx.Response(403, headers={"X-Error-Message": "You don't have the rights to create a model under "
                                            "the namespace lab"}, json={"error": "forbidden"}, request=request)

    state["handler"] = handler
    monkeypatch.setattr(hub_upload, "validate_staging", _passing_validation)
    assert hub_upload.main([str(export), "--repo-id", "lab/backpack", "--token", "hf_fine"]) == 6
    err = capsys.readouterr().err
    assert "may not write to lab/backpack (403 Forbidden)" in err and "rights to create a model" in err
    assert "Nothing was pushed" in err
    sent = [(r.method, r.url.path) for r in requests]
    assert ("POST", "/api/repos/create") in sent
    assert not any("/commit/" in path or "preupload" in path for _, path in sent)
    payload = json.loads(next(r for r in requests if r.url.path == "/api/repos/create").content)
    assert (payload["name"], payload["organization"], payload["type"]) == ("backpack", "lab", "model")


def test_network_failure_gives_the_clear_message(export, hub_http, monkeypatch, capsys):
    state, _, httpx = hub_http

    def handler(request, httpx):
        raise httpx.ConnectError("[Errno -3] Temporary failure in name resolution", request=request)

    state["handler"] = handler
    monkeypatch.setattr(hub_upload, "load_checkpoint", _must_not_run)
    assert hub_upload.main([str(export), "--repo-id", REPO_ID, "--token", "hf_test"]) == 8
    err = capsys.readouterr().err
    assert "could not reach the Hub" in err and "Nothing was pushed" in err


def test_help_documents_exit_codes(capsys):
    with pytest.raises(SystemExit) as exit_info:
        hub_upload.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--dry-run" in out and "--max-shard-size" in out and "Exit codes:" in out and "403" in out
