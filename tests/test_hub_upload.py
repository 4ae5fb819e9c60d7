"""hub_upload.py: staging folder, model card, fresh-process validation, and the push as one HfApi commit.

The Hub is unreachable here, so pushes are intercepted at the HfApi method level (asserting on what would be sent)
and, for authentication / permission / network failures, at the HTTP level: huggingface_hub's own client runs
against a mock transport, so the errors are the ones it really raises.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import importlib
import io
import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_CHECKPOINT, tiny_model
from hub_cache import CODE_FILES, PUBLISHED_ID, add_to_hub_cache, stand_in_code
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, ModelCard
from huggingface_hub import errors as hub_errors
from huggingface_hub.hf_api import CommitInfo, RepoUrl
from huggingface_hub.utils import _http as hub_http_module
from safetensors.torch import load_file, save_file

import hub_upload
from backpack.tokenizer import gpt2_tokenizer
from backpack_hub import code_update, hub, publish
from backpack_hub.card import build_model_card
from backpack_hub.checkpoint import load_checkpoint
from backpack_hub.code_update import CODE_UPDATE_MESSAGE
from backpack_hub.errors import CheckpointError, ValidationFailed
from backpack_hub.publish import push_checkpoint
from backpack_hub.staging import AUTO_MAP, CODE_MODULES, human_size, stage
from backpack_hub.validation import VALIDATION_PROMPT, ValidationReport, reference_batch, validate_staging
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
        size = human_size((staging / name).stat().st_size)
        assert any(line.split() == [name, *size.split()] for line in listing.splitlines()), (name, size, listing)
    assert f"{len(files)} files" in listing


def test_staging_loads_with_remote_code_in_a_fresh_process_with_equal_logits_and_generates(dry_run):
    code, output, _ = dry_run
    assert code == 0, output
    line = next(line for line in output.splitlines() if line.strip().startswith("ok in"))
    assert "loaded as transformers_modules." in line  # the folder's own code, not the installed module
    assert "logits identical to the checkpoint's (max |diff| 0.0e+00)" in line
    assert f"pipeline: '{VALIDATION_PROMPT}" in line


def test_staged_code_is_the_installed_package_and_config_points_at_it(dry_run, export):
    _, _, staging = dry_run
    for module in CODE_MODULES:
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
    assert f'backpack.load_model("{REPO_ID}")' in text  # the way that runs no code from the repo
    assert 'pipeline("text-generation"' in text and "sense_logits" in text
    for fact in ("200 of 200 scheduled", "819,200", "4,096 tokens per optimizer step", "peak learning rate 0.0006",
                 "20 warm-up steps", "<code>bf16</code>", "5m 20s", "544.93", "50601.20", "1,666,336"):
        assert fact in text, fact
    assert "@inproceedings{hewitt-etal-2023-backpack" in text and "Backpack Language Models" in text


def test_existing_card_keeps_its_text_and_gets_its_metadata_updated(export, tmp_path):
    folder = tmp_path / "model"
    for path in export.iterdir():
        (folder / path.name).parent.mkdir(exist_ok=True)
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "README.md").write_text("---\nlicense: mit\ntags:\n- mine\n---\n\n# My notes\n\nHand-written.\n")
    checkpoint = load_checkpoint(folder)
    card = build_model_card(checkpoint, REPO_ID)
    card.save(tmp_path / "README.md")
    reloaded = ModelCard.load(tmp_path / "README.md")
    assert "# My notes\n\nHand-written." in reloaded.text and "## Training details" not in reloaded.text
    assert reloaded.data.license == "mit"  # the author's choice is kept
    assert reloaded.data.tags[0] == "mine" and "backpack" in reloaded.data.tags
    assert reloaded.data.library_name == "transformers" and reloaded.data.pipeline_tag == "text-generation"
    assert reloaded.data.eval_results[0].metric_value == pytest.approx(544.93)


def test_sharding_above_the_limit_writes_an_index_that_loads(export, tmp_path):
    checkpoint = load_checkpoint(export)
    files = stage(checkpoint, tmp_path / "staging", REPO_ID, max_shard_size="2MB")
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
    checkpoint = load_checkpoint(checkpoint_dir)
    assert checkpoint.kind == "accelerate" and checkpoint.export_dir == run / "model"
    assert torch.equal(_logits(checkpoint.model), _logits(trained))
    assert checkpoint.step == 100 and checkpoint.tokens == 409_600
    assert checkpoint.metrics == {}  # the final export's metrics describe step 200, not these weights
    card = build_model_card(checkpoint, REPO_ID).content
    assert "100 of 200 scheduled" in card and "No evaluation was recorded" in card and "model-index" not in card


@pytest.mark.parametrize("broken", ["int64", "nan"])
def test_a_broken_accelerate_checkpoint_is_refused_naming_file_and_tensor(tmp_path, capsys, broken):
    run = tmp_path / "run"
    export_like_trainer(_model(seed=1), run / "model")
    checkpoint_dir = accelerate_checkpoint(_model(seed=2), run / "checkpoints" / "checkpoint_0", step=100)
    weights = checkpoint_dir / "model.safetensors"
    state, name = load_file(weights), "backpack.sense_weight_net.c_attn.weight"
    if broken == "int64":  # no longer floating point, as a careless edit leaves it: a cast would hide it
        state[name] = state[name].long()
    else:
        state[name][0, 0] = float("nan")
    save_file(state, weights, metadata={"format": "pt"})
    assert hub_upload.main([str(checkpoint_dir), "--repo-id", REPO_ID, "--dry-run"]) == 3
    err = capsys.readouterr().err
    expected = "is stored as I64" if broken == "int64" else "holds 1 NaN value(s)"
    assert f"{checkpoint_dir}" in err and "backpack.sense_weight_net.c_attn.weight" in err and expected in err


def test_accelerate_checkpoint_with_only_the_run_json(tmp_path):
    run = tmp_path / "run"
    trained = _model(seed=3)
    checkpoint_dir = accelerate_checkpoint(trained, run / "checkpoints" / "checkpoint_4", step=200)
    (checkpoint_dir / "model").mkdir()
    (checkpoint_dir / "model" / "training_args.json").write_text(
        json.dumps({"training_args": RUN_ARGS, "metrics": RUN_METRICS}))
    checkpoint = load_checkpoint(checkpoint_dir)
    assert checkpoint.export_dir is None and checkpoint.model.config.num_senses == 4
    assert torch.equal(_logits(checkpoint.model), _logits(trained))
    assert checkpoint.metrics["val_perplexity"] == pytest.approx(544.93)  # exported with these weights
    assert checkpoint.model.generation_config.max_length == 32


def test_accelerate_checkpoint_without_any_configuration_names_what_is_missing(tmp_path):
    checkpoint_dir = accelerate_checkpoint(_model(), tmp_path / "run" / "checkpoints" / "checkpoint_0", step=1)
    with pytest.raises(CheckpointError, match="no config.json or training_args.json") as error:
        load_checkpoint(checkpoint_dir)
    assert str(checkpoint_dir / "model") in str(error.value)
    assert hub_upload.main([str(checkpoint_dir), "--repo-id", REPO_ID, "--dry-run"]) == 3


def test_not_a_checkpoint_points_at_the_export(export, tmp_path, capsys):
    assert hub_upload.main([str(export.parent), "--repo-id", REPO_ID, "--dry-run"]) == 3
    assert f"the run's export is {export}" in capsys.readouterr().err


def trainer_checkpoint(model: BackpackGPT2LMHeadModel, folder: Path, step: int, metrics: dict | None = None) -> Path:
    """A checkpoint as the current trainer writes it: Accelerate's files (no pickles), training_state.json, the
    exported model/ folder, and the manifest checkpoint.json (written last) listing every file's size and SHA-256."""
    from accelerate import checkpointing

    folder.mkdir(parents=True)
    optimizer = torch.optim.AdamW(model.parameters())
    checkpointing.save_accelerator_state(str(folder), [model.state_dict()], [optimizer], [], [], 0, step)
    for pickled in folder.glob("*.pkl"):  # the trainer keeps its RNG states in safetensors instead
        pickled.unlink()
    state = {"step": step, "micro_batches": step * 2, "tokens": step * 4096, "sequences_per_step": 8}
    (folder / "training_state.json").write_text(json.dumps(state))
    export_like_trainer(model, folder / "model", metrics={**RUN_METRICS, "step": step, "tokens": step * 4096}
                        if metrics is None else metrics)
    files = {path.relative_to(folder).as_posix(): {"bytes": path.stat().st_size,
                                                   "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
             for path in sorted(folder.rglob("*")) if path.is_file()}
    (folder / "checkpoint.json").write_text(json.dumps({"format": 1, "step": step, "files": files}))
    return folder


def test_trainer_checkpoint_reads_its_position_from_training_state_json(tmp_path):
    trained = _model(seed=5)
    folder = trainer_checkpoint(trained, tmp_path / "run" / "checkpoints" / "checkpoint_3", step=150)
    # A pickle dropped in later is never read: the position comes from the JSON only.
    torch.save({"step": 999, "tokens": 1}, folder / "custom_checkpoint_0.pkl")
    checkpoint = load_checkpoint(folder)
    assert checkpoint.kind == "accelerate" and checkpoint.export_dir == folder / "model"
    assert (checkpoint.step, checkpoint.tokens) == (150, 150 * 4096)
    assert torch.equal(_logits(checkpoint.model), _logits(trained))
    assert checkpoint.metrics["val_perplexity"] == pytest.approx(544.93)  # exported with these weights
    exported = load_checkpoint(folder / "model")  # its export, through the package's loader
    assert exported.kind == "export" and torch.equal(_logits(exported.model), _logits(trained))


@pytest.mark.parametrize("given", ["checkpoint", "its export"])
def test_trainer_checkpoint_without_its_manifest_is_refused_as_incomplete(tmp_path, capsys, given):
    folder = trainer_checkpoint(_model(), tmp_path / "run" / "checkpoints" / "checkpoint_0", step=10)
    (folder / "checkpoint.json").unlink()  # the save stopped before its last write
    target = folder if given == "checkpoint" else folder / "model"
    assert hub_upload.main([str(target), "--repo-id", REPO_ID, "--dry-run"]) == 3
    err = capsys.readouterr().err
    assert f"{folder} is an incomplete trainer checkpoint: it has no checkpoint.json" in err


def test_trainer_checkpoint_with_a_file_that_does_not_match_its_manifest_is_refused(tmp_path):
    folder = trainer_checkpoint(_model(), tmp_path / "run" / "checkpoints" / "checkpoint_0", step=10)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    with pytest.raises(CheckpointError, match="model.safetensors does not match its size / SHA-256"):
        load_checkpoint(folder)


def test_checkpoint_with_only_accelerate_files_in_a_checkpoints_folder_is_refused_as_incomplete(tmp_path):
    folder = tmp_path / "run" / "checkpoints" / "checkpoint_0"
    folder.mkdir(parents=True)
    from accelerate import checkpointing

    model = _model()
    checkpointing.save_accelerator_state(str(folder), [model.state_dict()],
                                         [torch.optim.AdamW(model.parameters())], [], [], 0, 1)
    (folder / "random_states_0.pkl").unlink()  # stopped before the trainer's own files were written
    with pytest.raises(CheckpointError, match="incomplete trainer checkpoint"):
        load_checkpoint(folder)


# --- honest metrics in the card ----------------------------------------------------------------------------------

ZERO_TOKEN_VALIDATION = dict(RUN_METRICS, start_val_loss=0.0, start_val_perplexity=1.0, val_loss=0.0,
                             val_perplexity=1.0)


@pytest.mark.parametrize("metrics", [
    dict(ZERO_TOKEN_VALIDATION, start_val_tokens=0, val_tokens=0),  # the count recorded
    ZERO_TOKEN_VALIDATION,  # older runs: only the signature of an empty average (loss 0, perplexity exp(0))
], ids=["token count", "signature"])
def test_validation_on_zero_tokens_gives_no_model_index_and_no_perplexity(tmp_path, metrics):
    folder = export_like_trainer(_model(), tmp_path / "model", metrics=metrics)
    checkpoint = load_checkpoint(folder)
    card = build_model_card(checkpoint, REPO_ID)
    assert not card.data.eval_results and "model-index" not in card.content
    assert "perplexity" not in (card.data.metrics or [])
    evaluation = card.text[card.text.index("## Evaluation"):card.text.index("## Limitations")]
    assert "| validation, these weights | not measured (0 tokens" in evaluation
    assert "1.00" not in evaluation and "1.0000" not in evaluation and "before training" not in evaluation
    assert "| training batch, last step | 6.1200 | – |" in evaluation


def test_recorded_fields_are_shown_as_text_and_a_quoted_revision_stays_inside_its_string(tmp_path):
    import ast

    folder = export_like_trainer(_model(), tmp_path / "model")
    hostile = '<img src=x onerror="alert(1)"> | [click](https://evil.example) `code` **bold**'
    record = json.loads((folder / "training_args.json").read_text())
    record["training_args"].update(dataset=str(tmp_path / hostile.replace("/", "_")), dataset_config=hostile,
                                   lr_scheduler="linear` <b>x</b>", adam_beta1=hostile, learning_rate="<i>lr</i>")
    record["metrics"].update(stopped_by=hostile, hardware="<script>alert(1)</script>\n| injected | row |")
    (folder / "training_args.json").write_text(json.dumps(record))
    revision = 'step-1", trust_remote_code=True); import os; os.system("x") #```'
    text = build_model_card(load_checkpoint(folder), REPO_ID, revision=revision).text
    for raw in ("<img", "<script", "<b>", "<i>", "](https://evil", "| injected | row |"):
        assert raw not in text, raw
    assert "&lt;img src=x onerror=" in text and "&lt;script&gt;alert\\(1\\)&lt;/script&gt;" in text
    training = text[text.index("## Training details"):text.index("## Evaluation")]
    rows = [line for line in training.splitlines() if line.startswith("| ") and not line.startswith("| |")]
    assert len(rows) >= 8 and all(line.count(" | ") == 1 for line in rows)  # two cells each: no | got through
    # Every code block still parses, and the revision is one string argument wherever it is passed.
    blocks = [block.split("\n", 1)[1] for block in text.split("```")[1::2] if block.startswith("python")]
    revisions = [keyword.value.value for block in blocks for node in ast.walk(ast.parse(block))
                 if isinstance(node, ast.Call) for keyword in node.keywords if keyword.arg == "revision"]
    assert len(revisions) == 3 and set(revisions) == {revision}


def test_a_run_without_any_validation_metric_gives_no_model_index(tmp_path):
    metrics = {key: value for key, value in RUN_METRICS.items() if "val_" not in key}
    checkpoint = load_checkpoint(export_like_trainer(_model(), tmp_path / "model", metrics=metrics))
    card = build_model_card(checkpoint, REPO_ID)
    assert not card.data.eval_results and "model-index" not in card.content and "perplexity |" in card.text
    assert "| validation" not in card.text


def test_measured_validation_is_reported_even_when_its_count_is_recorded(tmp_path):
    metrics = dict(RUN_METRICS, val_tokens=20_480, start_val_tokens=20_480)
    checkpoint = load_checkpoint(export_like_trainer(_model(), tmp_path / "model", metrics=metrics))
    card = build_model_card(checkpoint, REPO_ID)
    assert card.data.eval_results[0].metric_value == pytest.approx(544.93)


def test_an_existing_cards_results_are_dropped_when_the_run_measured_zero_tokens(tmp_path):
    folder = export_like_trainer(_model(), tmp_path / "model", metrics=dict(ZERO_TOKEN_VALIDATION, val_tokens=0))
    old = build_model_card(load_checkpoint(export_like_trainer(
        _model(), tmp_path / "before" / "model")), REPO_ID)
    assert old.data.eval_results  # the earlier push had measured results
    old.save(folder / "README.md")
    card = build_model_card(load_checkpoint(folder), REPO_ID)
    assert not card.data.eval_results and "model-index" not in card.content


# --- the push, intercepted at the HfApi boundary -----------------------------------------------------------------


class FakeHub:
    """Records what HfApi would send; answers like the Hub for a writable user ``someone``."""

    def __init__(self, remote_files: list[str] | None = None, existing_public: bool = False,
                 snapshot: Path | None = None):
        self.calls: list[tuple[str, dict]] = []
        self.remote_files = remote_files or [".gitattributes"]
        self.existing_public = existing_public
        self.snapshot = snapshot  # what snapshot_download "downloads" (a folder of a Hub cache)
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
            pr_url = f"https://huggingface.co/{repo_id}/discussions/7" if kwargs.get("create_pr") else None
            return CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/abc123", commit_message="m",
                              commit_description="", oid="abc123", pr_url=pr_url)

        def snapshot_download(api, repo_id, **kwargs):
            fake.calls.append(("snapshot_download", {"repo_id": repo_id, **kwargs}))
            assert fake.snapshot is not None, "snapshot_download called: only --update-code downloads a repo"
            return str(fake.snapshot)

        for name, function in dict(whoami=whoami, create_repo=create_repo, repo_info=repo_info,
                                   create_branch=create_branch, list_repo_files=list_repo_files,
                                   create_commit=create_commit, snapshot_download=snapshot_download,
                                   upload_folder=None, upload_file=None).items():
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
    monkeypatch.setattr(publish, "validate_staging", _passing_validation)
    lines: list[str] = []
    url = push_checkpoint(export, f"https://huggingface.co/{REPO_ID}", token="hf_test", log=lines.append)
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
    real_reference = reference_batch

    def wrong_reference(model, tokenizer):  # as if the staged folder computed something else than the checkpoint
        reference = real_reference(model, tokenizer)
        reference["logits"] = reference["logits"] + 1e-3
        return reference

    monkeypatch.setattr(publish, "reference_batch", wrong_reference)
    code = hub_upload.main([str(export), "--repo-id", REPO_ID, "--token", "hf_test"])
    assert code == 4
    err = capsys.readouterr().err
    assert "validation failed, nothing was pushed" in err and "logits differ from the checkpoint's" in err
    assert hub.names() == ["whoami"]  # the token check only: no repo, no branch, no commit


def test_existing_public_repo_is_not_pushed_to_when_private_was_asked(export, monkeypatch, capsys):
    hub = FakeHub(existing_public=True).install(monkeypatch)
    monkeypatch.setattr(publish, "validate_staging", _passing_validation)
    assert hub_upload.main([str(export), "--repo-id", REPO_ID, "--private", "--token", "hf_test"]) == 7
    assert "already exists and is public" in capsys.readouterr().err
    assert "create_commit" not in hub.names()


def test_dataset_or_space_repo_ids_are_refused(export, capsys):
    assert hub_upload.main([str(export), "--repo-id", "datasets/someone/x", "--dry-run"]) == 7
    assert "is a dataset repo" in capsys.readouterr().err
    assert hub_upload.main([str(export), "--repo-id", "no-owner", "--dry-run"]) == 2


def test_missing_token_is_a_clear_error_before_any_work(export, monkeypatch, capsys):
    monkeypatch.setattr(hub, "get_token", lambda: None)
    monkeypatch.setattr(publish, "load_checkpoint", _must_not_run)
    assert hub_upload.main([str(export), "--repo-id", REPO_ID]) == 5
    err = capsys.readouterr().err
    assert "no Hugging Face token" in err and "hf auth login" in err and "HF_TOKEN" in err


def test_read_only_token_is_refused(export, monkeypatch, capsys):
    FakeHub().install(monkeypatch)
    monkeypatch.setattr(HfApi, "whoami", lambda api, token=None, **kw: {
        "type": "user", "name": "someone", "orgs": [], "auth": {"accessToken": {"displayName": "ro", "role": "read"}}})
    monkeypatch.setattr(publish, "load_checkpoint", _must_not_run)
    assert hub_upload.main([str(export), "--repo-id", REPO_ID, "--token", "hf_ro"]) == 6
    assert "read-only" in capsys.readouterr().err


# --- HTTP-level failures: huggingface_hub's real client against a mock transport --------------------------------


def _must_not_run(*args, **kwargs):
    raise AssertionError("this step must not run")


def _passing_validation(staging, reference, **kwargs):
    return ValidationReport("transformers_modules.x.BackpackGPT2LMHeadModel", True, 0.0, "p", "p q", 0.0)


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
    monkeypatch.setattr(hub, "_API", None)  # no whoami answer cached by another test
    previous = hub_http_module._GLOBAL_CLIENT_FACTORY
    hub_http_module.set_client_factory(lambda: httpx.Client(transport=httpx.MockTransport(transport)))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    yield state, requests, httpx
    hub_http_module.set_client_factory(previous)


def test_http_401_on_the_token_check_gives_the_clear_message(export, hub_http, monkeypatch, capsys):
    state, requests, httpx = hub_http
    state["handler"] = lambda request, httpx: httpx.Response(
        401, json={"error": "Invalid credentials in Authorization header"}, request=request)
    monkeypatch.setattr(publish, "load_checkpoint", _must_not_run)
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
    monkeypatch.setattr(publish, "validate_staging", _passing_validation)
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
    monkeypatch.setattr(publish, "load_checkpoint", _must_not_run)
    assert hub_upload.main([str(export), "--repo-id", REPO_ID, "--token", "hf_test"]) == 8
    err = capsys.readouterr().err
    assert "could not reach the Hub" in err and "Nothing was pushed" in err


def test_help_documents_exit_codes(capsys):
    with pytest.raises(SystemExit) as exit_info:
        hub_upload.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--dry-run" in out and "--max-shard-size" in out and "Exit codes:" in out and "403" in out


# --- --update-code: a pull request with the installed model code on an existing repo --------------------------------


def published_layout(model: BackpackGPT2LMHeadModel, **config_changes) -> dict[str, bytes]:
    """config.json + pytorch_model.bin as the 2023 repo holds them (model_type gpt2 + auto_map, aliased keys)."""
    config = json.loads((TINY_CHECKPOINT / "config.json").read_text())
    config.update(n_embd=model.config.n_embd, n_layer=model.config.n_layer, n_head=model.config.n_head,
                  n_positions=model.config.n_positions, num_senses=model.config.num_senses,
                  vocab_size=model.config.vocab_size, bos_token_id=EOS, eos_token_id=EOS, **config_changes)
    weights = io.BytesIO()
    torch.save(model.state_dict(), weights)
    return {"config.json": json.dumps(config, indent=2).encode(), "pytorch_model.bin": weights.getvalue(),
            ".gitattributes": b"*.bin filter=lfs diff=lfs merge=lfs -text\n"}


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> dict:
    """A Hub cache holding a tiny Backpack with GPT-2's vocabulary in the published layout as
    ``stanfordnlp/backpack-gpt2``, with code files that fail on import like the 2023 ones."""
    root = tmp_path_factory.mktemp("published")
    cache, marker, model = root / "cache", root / "imported-repo-code.txt", _model(seed=6)
    files: dict = published_layout(model)
    files.update({name: stand_in_code(marker, name) for name in CODE_FILES})
    snapshot = add_to_hub_cache(cache, PUBLISHED_ID, files)
    return {"cache": cache, "marker": marker, "snapshot": snapshot, "model": model, "root": root}


def _installed_code() -> dict[str, bytes]:
    return {Path(module.__file__).name: Path(module.__file__).read_bytes() for module in CODE_MODULES}


def planted_code(marker: Path, name: str) -> bytes:
    """A module that records its import in `marker`, then fails: any trace of it running shows in the marker."""
    return (f"with open({str(marker)!r}, 'a') as handle:\n    handle.write({name!r} + '\\n')\n"
            f"raise SystemExit('planted code ran: {name}')\n").encode()


def planted_repo(published: dict, repo_id: str, plant: str) -> Path:
    """The published layout (with its failing 2023 code) plus planted code that a careless validation would run:
    a ``custom_generate/generate.py`` (transformers installs it as generate() under trust_remote_code=True), or a
    tokenizer whose ``auto_map`` names an ``evil_tok.py`` of the repo."""
    marker = published["marker"]
    files: dict = published_layout(published["model"])
    files.update({name: stand_in_code(marker, name) for name in CODE_FILES})
    if plant == "custom_generate":
        files["custom_generate/generate.py"] = planted_code(marker, "custom_generate/generate.py")
    else:
        folder = published["root"] / f"tokenizer-{plant}"
        gpt2_tokenizer(model_max_length=32).save_pretrained(folder)
        files.update({path.name: path for path in folder.iterdir()})
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config["auto_map"] = {"AutoTokenizer": [None, "evil_tok.EvilTokenizer"]}
        files["tokenizer_config.json"] = json.dumps(config).encode()
        files["evil_tok.py"] = planted_code(marker, "evil_tok.py")
    return add_to_hub_cache(published["cache"], repo_id, files)


@pytest.mark.parametrize("plant", ["custom_generate", "tokenizer_auto_map"])
def test_update_code_dry_run_runs_only_the_installed_code_and_validates_it_offline(published, monkeypatch, capsys,
                                                                                   tmp_path, plant):
    from huggingface_hub import constants

    repo_id = f"planted/{plant.replace('_', '-')}"
    snapshot = planted_repo(published, repo_id, plant)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read from the hand-built cache, as a user offline
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(published["cache"]))
    monkeypatch.setattr(hub, "_API", None)
    staging = tmp_path / "staging"
    code = hub_upload.main(["--update-code", repo_id, "--dry-run", "--staging-dir", str(staging)])
    output = capsys.readouterr()
    assert code == 0, output.err
    # No code of the repo ran: not its 2023 model files, not the planted module, in this process or the fresh one.
    assert not published["marker"].exists(), published["marker"].read_text()
    assert f"commit {snapshot.name}" in output.out
    line = next(line for line in output.out.splitlines() if line.strip().startswith("ok in"))
    assert "loaded as transformers_modules." in line and "logits identical" in line  # the swapped-in code ran
    listing = output.out[output.out.index("[4/4]"):].splitlines()[1:]
    assert [row.split()[0] for row in listing[:-1]] == sorted(CODE_FILES) and listing[-1].startswith("  2 files")
    # The validation folder is the repo's weights and config beside the installed code files, nothing else.
    assert sorted(path.name for path in staging.iterdir()) == sorted(["config.json", "pytorch_model.bin", *CODE_FILES])
    for name, data in _installed_code().items():
        assert (staging / name).read_bytes() == data
    assert (staging / "pytorch_model.bin").resolve() == (snapshot / "pytorch_model.bin").resolve()  # linked
    assert (staging / "config.json").read_bytes() == (snapshot / "config.json").read_bytes()
    # Honest about what it did not cover: the planted code is named as left as it is and never run.
    note = next(line for line in output.out.splitlines() if "never run here and not validated" in line)
    if plant == "custom_generate":
        assert "custom_generate/generate.py" in note
        assert "tokenizer: GPT-2's" in output.out
    else:
        assert "evil_tok.py" in note and "tokenizer_config.json auto_map AutoTokenizer" in note
        assert "tokenizer: the repo's files, loaded without trust_remote_code" in output.out


def test_validation_refuses_a_folder_with_code_other_than_the_installed_files_before_starting(tmp_path):
    from backpack_hub.validation import check_only_installed_code

    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "config.json").write_text(json.dumps({"auto_map": AUTO_MAP}))
    for name, data in _installed_code().items():
        (staging / name).write_bytes(data)
    check_only_installed_code(staging)  # the clean folder passes
    (staging / "custom_generate").mkdir()
    (staging / "custom_generate" / "generate.py").write_text("raise SystemExit('ran')\n")
    (staging / "modeling_backpack_gpt2.py").write_text("raise SystemExit('ran')\n")
    with pytest.raises(ValidationFailed, match="custom_generate/ .*modeling_backpack_gpt2.py"):
        validate_staging(staging, {})


def test_a_staged_tokenizer_carries_no_auto_map(tmp_path):
    from backpack_hub.staging import save_tokenizer_without_code

    tokenizer = gpt2_tokenizer(model_max_length=32)
    tokenizer.init_kwargs["auto_map"] = {"AutoTokenizer": [None, "evil_tok.EvilTokenizer"]}
    save_tokenizer_without_code(tokenizer, tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert "auto_map" not in config and config["tokenizer_class"] == "GPT2Tokenizer"


@pytest.mark.parametrize("auto_map", ["current", "missing"])
def test_update_code_opens_one_pull_request_with_only_the_changed_files(published, monkeypatch, capsys, auto_map):
    snapshot = published["snapshot"]
    if auto_map == "missing":  # an older config.json: only architectures names the class
        files: dict = published_layout(published["model"], auto_map=None)
        config = json.loads(files["config.json"])
        del config["auto_map"]
        files["config.json"] = json.dumps(config, indent=2).encode()
        files.update({name: stand_in_code(published["marker"], name) for name in CODE_FILES})
        snapshot = add_to_hub_cache(published["cache"], "someone/backpack-old-config", files)
    hub = FakeHub(snapshot=snapshot).install(monkeypatch)
    monkeypatch.setattr(code_update, "validate_staging", _passing_validation)
    repo_id = PUBLISHED_ID if auto_map == "current" else "someone/backpack-old-config"
    code = hub_upload.main(["--update-code", repo_id, "--token", "hf_test"])
    output = capsys.readouterr()
    assert code == 0, output.err
    # The token is checked, the repo downloaded, and ONE commit opened as a pull request on the validated commit;
    # whoami's user "someone" does not own stanfordnlp: a pull request needs no membership.
    assert hub.names() == ["whoami", "snapshot_download", "create_commit"]
    calls = dict(hub.calls)
    assert calls["snapshot_download"] == {"repo_id": repo_id, "repo_type": "model", "token": "hf_test"}
    [commit] = hub.commits
    assert commit["repo_id"] == repo_id and commit["create_pr"] is True and commit["token"] == "hf_test"
    assert commit["parent_commit"] == snapshot.name and commit.get("revision") is None
    assert commit["commit_message"] == CODE_UPDATE_MESSAGE
    assert "all_tied_weights_keys" in commit["commit_description"] and "weights are untouched" in \
        commit["commit_description"]
    assert commit["deleted"] == []
    expected = _installed_code()
    if auto_map == "missing":
        config = json.loads(commit["added"].pop("config.json"))
        assert config["auto_map"] == AUTO_MAP and config["architectures"] == ["BackpackGPT2LMHeadModel"]
        original = json.loads((snapshot / "config.json").read_text())
        assert {k: v for k, v in config.items() if k != "auto_map"} == original  # nothing else changed
    assert commit["added"] == expected  # the two code files; never the weights
    assert f"Opened pull request: https://huggingface.co/{repo_id}/discussions/7" in output.out
    assert f'from_pretrained("{repo_id}", revision="refs/pr/7", trust_remote_code=True)' in output.out


def test_update_code_with_failed_validation_opens_no_pull_request(published, monkeypatch, capsys):
    hub = FakeHub(snapshot=published["snapshot"]).install(monkeypatch)
    real_reference = reference_batch

    def wrong_reference(model, tokenizer):  # as if the new code computed something else than the installed classes
        reference = real_reference(model, tokenizer)
        reference["logits"] = reference["logits"] + 1e-3
        return reference

    monkeypatch.setattr(code_update, "reference_batch", wrong_reference)
    assert hub_upload.main(["--update-code", PUBLISHED_ID, "--token", "hf_test"]) == 4
    err = capsys.readouterr().err
    assert "validation failed, no pull request was opened" in err and "logits differ" in err
    assert hub.names() == ["whoami", "snapshot_download"]


def test_update_code_refuses_a_repo_that_is_not_a_backpack(published, monkeypatch, capsys, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=64, n_positions=16)).save_pretrained(tmp_path)
    snapshot = add_to_hub_cache(published["cache"], "someone/gpt2-small",
                                {p.name: p for p in tmp_path.iterdir() if p.is_file()})
    hub = FakeHub(snapshot=snapshot).install(monkeypatch)
    monkeypatch.setattr(code_update, "validate_staging", _must_not_run)
    assert hub_upload.main(["--update-code", "someone/gpt2-small", "--token", "hf_test"]) == 3
    assert "is not a Backpack GPT-2 configuration" in capsys.readouterr().err
    assert "create_commit" not in hub.names()


def test_update_code_on_a_repo_that_already_has_the_code_proposes_nothing(published, monkeypatch, capsys):
    files: dict = published_layout(published["model"])
    files.update(_installed_code())
    snapshot = add_to_hub_cache(published["cache"], "someone/backpack-current", files)
    hub = FakeHub(snapshot=snapshot).install(monkeypatch)
    monkeypatch.setattr(code_update, "validate_staging", _must_not_run)
    assert hub_upload.main(["--update-code", "someone/backpack-current", "--token", "hf_test"]) == 0
    assert "already has this package's model code and auto_map: nothing to propose" in capsys.readouterr().out
    assert hub.names() == ["whoami", "snapshot_download"]


@pytest.mark.parametrize("argv", [["some/folder", "--update-code", PUBLISHED_ID],
                                  ["--update-code", PUBLISHED_ID, "--repo-id", REPO_ID],
                                  ["--update-code", PUBLISHED_ID, "--private"],
                                  []])
def test_update_code_and_publishing_arguments_do_not_mix(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        hub_upload.main(argv)
    assert exit_info.value.code == 2
    assert "--update-code" in capsys.readouterr().err


def _pull_request_handler(status: int = 200):
    """The Hub's answers for a user ``someone`` opening pull request #12 (or refusing the commit with `status`)."""

    def handler(request, httpx):
        path = request.url.path
        if path == "/api/whoami-v2":
            return httpx.Response(200, json={"type": "user", "name": "someone", "orgs": [],
                                             "auth": {"accessToken": {"role": "write"}}}, request=request)
        if path.startswith(f"/api/models/{PUBLISHED_ID}/preupload/"):
            files = json.loads(request.content)["files"]
            return httpx.Response(200, json={"files": [{"path": f["path"], "uploadMode": "regular",
                                                        "shouldIgnore": False} for f in files]}, request=request)
        if path == f"/api/models/{PUBLISHED_ID}/commit/main" and status == 200:
            return httpx.Response(200, json={
                "commitUrl": f"https://huggingface.co/{PUBLISHED_ID}/commit/{'d' * 40}", "commitOid": "d" * 40,
                "pullRequestUrl": f"https://huggingface.co/{PUBLISHED_ID}/discussions/12"}, request=request)
        if path == f"/api/models/{PUBLISHED_ID}/commit/main":
            return httpx.Response(status, headers={"X-Error-Message": "Forbidden: pull requests are disabled"},
                                  json={"error": "forbidden"}, request=request)
        return httpx.Response(404, json={"error": f"unexpected request {path}"}, request=request)

    return handler


def test_update_code_http_sends_one_pull_request_commit_of_the_code_files(published, hub_http, monkeypatch, capsys):
    state, requests, _ = hub_http
    state["handler"] = _pull_request_handler()
    monkeypatch.setattr(HfApi, "snapshot_download", lambda api, repo_id, **kwargs: str(published["snapshot"]))
    monkeypatch.setattr(code_update, "validate_staging", _passing_validation)
    code = hub_upload.main(["--update-code", PUBLISHED_ID, "--token", "hf_test"])
    output = capsys.readouterr()
    assert code == 0, output.err
    [commit] = [r for r in requests if r.url.path.endswith("/commit/main")]
    assert commit.method == "POST" and commit.url.params["create_pr"] == "1"
    assert commit.headers["authorization"] == "Bearer hf_test"
    lines = [json.loads(line) for line in commit.content.decode().splitlines()]
    header = lines[0]
    assert header["key"] == "header" and header["value"]["summary"] == CODE_UPDATE_MESSAGE
    assert header["value"]["parentCommit"] == published["snapshot"].name
    sent = {line["value"]["path"]: base64.b64decode(line["value"]["content"]) for line in lines[1:]
            if line["key"] == "file"}
    assert sent == _installed_code() and len(lines) == 3  # nothing else: no weights, no deletions
    assert f"Opened pull request: https://huggingface.co/{PUBLISHED_ID}/discussions/12" in output.out
    assert 'revision="refs/pr/12"' in output.out


def test_update_code_http_403_on_the_pull_request_is_a_clear_error(published, hub_http, monkeypatch, capsys):
    state, requests, _ = hub_http
    state["handler"] = _pull_request_handler(status=403)
    monkeypatch.setattr(HfApi, "snapshot_download", lambda api, repo_id, **kwargs: str(published["snapshot"]))
    monkeypatch.setattr(code_update, "validate_staging", _passing_validation)
    assert hub_upload.main(["--update-code", PUBLISHED_ID, "--token", "hf_test"]) == 6
    err = capsys.readouterr().err
    assert "opening the pull request" in err and "403 Forbidden" in err and "pull requests are disabled" in err


def test_reference_batch_fits_a_vocabulary_smaller_than_the_tokenizers():
    """A Backpack trained on a small vocabulary is validated with ids it accepts, not GPT-2's (an index error)."""
    model = tiny_model(0, vocab_size=512, n_positions=32).eval()
    reference = reference_batch(model, gpt2_tokenizer(model_max_length=32))
    assert int(reference["input_ids"].max()) < 512
    assert reference["logits"].shape[:2] == reference["input_ids"].shape
    assert torch.isfinite(reference["logits"]).all()
