"""Model hygiene: loud without remote code, no avoidable warnings, the paper's initialisation, the sense table as a
buffer, export with a dynamic sequence length (torch.export and ONNX), and LoRA adapters through PEFT."""

import logging
import math
import re
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from conftest import tiny_config, tiny_model
from transformers import GPT2LMHeadModel, pipeline

from backpack.tokenizer import gpt2_tokenizer
from modeling_backpack_gpt2 import LORA_TARGET_MODULES, BackpackGPT2LMHeadModel

# --- loading without remote code ------------------------------------------------------------------------------

WITHOUT_REMOTE_CODE = textwrap.dedent(
    """
    import sys
    from transformers import AutoModelForCausalLM, pipeline
    for load in (lambda: AutoModelForCausalLM.from_pretrained(sys.argv[1]),
                 lambda: pipeline("text-generation", model=sys.argv[1])):
        try:
            load()
        except Exception as error:
            print("REFUSED:", str(error).replace(chr(10), " "))
        else:
            print("LOADED")
    """
)


def test_saved_folder_is_refused_without_remote_code_and_names_the_fix(tmp_path):
    model = tiny_model(vocab_size=50264)
    model.save_pretrained(tmp_path)
    gpt2_tokenizer().save_pretrained(tmp_path)
    result = subprocess.run([sys.executable, "-c", WITHOUT_REMOTE_CODE, str(tmp_path)], capture_output=True,
                            text=True, cwd=tmp_path.parent, timeout=300,  # not the repo: nothing of ours importable
                            stdin=subprocess.DEVNULL)  # transformers asks on a terminal; no answer is a no
    lines = [line for line in result.stdout.splitlines() if "REFUSED:" in line or "LOADED" in line]
    assert len(lines) == 2 and all("trust_remote_code=True" in line for line in lines), result.stdout + result.stderr


IMPORT_BACKPACK_ONLY = textwrap.dedent(
    """
    import sys
    import backpack  # nothing else of this package
    from transformers import AutoModelForCausalLM
    print("LOADED", type(AutoModelForCausalLM.from_pretrained(sys.argv[1])).__module__)
    """
)


def test_import_backpack_alone_lets_auto_classes_load_a_saved_backpack(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    result = subprocess.run([sys.executable, "-c", IMPORT_BACKPACK_ONLY, str(tmp_path)], capture_output=True,
                            text=True, cwd=tmp_path.parent, timeout=300, stdin=subprocess.DEVNULL)
    assert "LOADED modeling_backpack_gpt2" in result.stdout, result.stdout + result.stderr[-2000:]


# --- no avoidable warnings ------------------------------------------------------------------------------------


def warnings_printed(model, folder, caplog) -> list[str]:
    """Every warning that saving, reloading, generating, the pipeline and a training step print for `model`."""
    model.generation_config.pad_token_id = 50256
    caplog.clear()
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        model.save_pretrained(folder)
        reloaded = type(model).from_pretrained(folder)
        reloaded.generate(torch.tensor([[464, 1110]]), max_new_tokens=3, do_sample=False)
        generator = pipeline("text-generation", model=reloaded, tokenizer=gpt2_tokenizer())
        generator("The river bank", max_new_tokens=3, do_sample=False)
        reloaded.train()
        reloaded(torch.tensor([[464, 1110, 318]]), labels=torch.tensor([[464, 1110, 318]])).loss.backward()
    messages = [str(w.message) for w in caught if not issubclass(w.category, DeprecationWarning)]
    messages += [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    # A set printed in a message lists its items in any order.
    return [re.sub(r"\{([^{}]*)\}", lambda items: "{" + ", ".join(sorted(items[1].split(", "))) + "}", message)
            for message in messages]


def test_save_load_generate_and_train_print_no_warning_of_their_own(tmp_path, caplog):
    """None at all on current transformers; older releases warn from their own generation code, for GPT-2 alike.
    GPT-2 goes first: a warning transformers prints once is then GPT-2's."""
    gpt2 = warnings_printed(GPT2LMHeadModel(tiny_model(vocab_size=50264).config.contextualization_config()),
                            tmp_path / "gpt2", caplog)
    backpack = warnings_printed(tiny_model(vocab_size=50264), tmp_path / "backpack", caplog)
    assert [message for message in backpack if message not in gpt2] == []


# --- the paper's initialisation ---------------------------------------------------------------------------------


def test_initialisation_follows_the_paper():
    torch.manual_seed(0)
    config = tiny_config(n_embd=256, n_head=4, num_senses=4, n_layer=3)
    model = BackpackGPT2LMHeadModel(config)
    senses = model.backpack.sense_network

    def std(tensor: torch.Tensor) -> float:
        return tensor.detach().float().std().item()

    def near(value: float, target: float) -> bool:
        return abs(value - target) < 0.05 * target  # each tensor has >= 65k entries: the estimate is within 1%

    residual = 0.02 / math.sqrt(2 * 1)  # the sense network: one residual layer
    assert near(std(senses.block.mlp.c_proj.weight), residual)
    assert near(std(senses.final_mlp.c_proj.weight), residual)
    assert near(std(senses.block.mlp.c_fc.weight), 0.02) and near(std(senses.final_mlp.c_fc.weight), 0.02)
    assert near(std(model.backpack.sense_weight_net.c_attn.weight), 0.02)
    assert torch.all(model.backpack.sense_weight_net.c_attn.bias == 0)
    depth = 0.02 / math.sqrt(2 * config.n_layer)  # GPT-2's residual projections
    for block in model.backpack.gpt2_model.h:
        assert near(std(block.attn.c_proj.weight), depth) and near(std(block.mlp.c_proj.weight), depth)
        assert near(std(block.attn.c_attn.weight), 0.02)
    assert near(std(model.backpack.word_embeddings.weight), 0.02)
    assert torch.all(senses.ln.weight == 1) and torch.all(senses.ln.bias == 0)


# --- the sense table ----------------------------------------------------------------------------------------------


def test_sense_table_moves_with_the_model_and_is_never_saved(tmp_path):
    model = tiny_model(2)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    model.precompute_senses()
    assert "backpack.sense_table" not in model.state_dict()
    with torch.no_grad():
        float32_logits = model(ids).logits
        model.to(torch.bfloat16)  # the table goes along (it used to stay float32 and fail the next forward)
        assert model.backpack.sense_table.dtype == torch.bfloat16
        bfloat16_logits = model(ids).logits.float()
    assert ((bfloat16_logits - float32_logits).abs().max() / float32_logits.abs().max()).item() < 2e-2
    model.save_pretrained(tmp_path)
    assert BackpackGPT2LMHeadModel.from_pretrained(tmp_path).backpack.sense_table is None


# --- export -------------------------------------------------------------------------------------------------------


class NextTokenLogits(torch.nn.Module):
    """The forward as a plain tensor -> tensor function, the shape exporters want."""

    def __init__(self, model: BackpackGPT2LMHeadModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def test_torch_export_and_onnx_with_a_dynamic_sequence_length(tmp_path):
    import onnxruntime  # the [dev] extra installs it, with onnx and onnxscript for the exporter
    module = NextTokenLogits(tiny_model(3)).eval()
    sequence = torch.export.Dim("sequence", min=1, max=64)
    example = torch.randint(0, 128, (2, 9))
    exported = torch.export.export(module, (example,), dynamic_shapes={"input_ids": {1: sequence}}, strict=False)
    program = torch.onnx.export(module, (example,), dynamic_shapes={"input_ids": {1: sequence}}, dynamo=True)
    program.save(str(tmp_path / "backpack.onnx"))
    runtime = onnxruntime.InferenceSession(str(tmp_path / "backpack.onnx"))
    for length in (1, 4, 31):  # none of them the traced length
        ids = torch.randint(0, 128, (2, length), generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            eager = module(ids)
        torch.testing.assert_close(exported.module()(ids), eager)
        onnx_logits = runtime.run(None, {runtime.get_inputs()[0].name: ids.numpy()})[0]
        torch.testing.assert_close(torch.from_numpy(onnx_logits), eager, rtol=1e-4, atol=1e-4)


# --- PEFT ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("targets", sorted(LORA_TARGET_MODULES))
def test_lora_adapter_trains_saves_reloads_and_merges(targets, tmp_path):
    import peft  # the [dev] extra installs it
    ids = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(4))
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGET_MODULES[targets], fan_in_fan_out=True,
                           init_lora_weights=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. PEFT's fan-in/fan-out mismatch warning
        adapted = peft.get_peft_model(tiny_model(4), lora)
    adapted_names = {name.split(".lora_A")[0] for name, _ in adapted.named_parameters() if "lora_A" in name}
    wants_attention, wants_senses = targets != "senses", targets != "attention"
    assert any(".attn.c_attn" in name for name in adapted_names) == wants_attention
    assert any("sense_network" in name for name in adapted_names) == wants_senses
    assert not any("sense_weight_net" in name for name in adapted_names)
    assert all(not p.requires_grad for name, p in adapted.named_parameters() if "lora_" not in name)

    optimizer = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = adapted(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]

    adapted.eval()
    with torch.no_grad():
        trained = adapted(input_ids=ids).logits
    adapted.save_pretrained(tmp_path)
    reloaded = peft.PeftModel.from_pretrained(tiny_model(4), tmp_path).eval()
    merged = reloaded.merge_and_unload()
    assert isinstance(merged, BackpackGPT2LMHeadModel)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, trained, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(tiny_model(4)(ids).logits, trained)
