"""transformers' on-device export recipes (ExecuTorch's entry points), run on the Backpack as on GPT-2.

`TorchExportableModuleForDecoderOnlyLM(model).export(...)` and `convert_and_export_with_cache(model)` build a plain
`StaticCache`, register its tensors as buffers and export a one-step program that keeps them between calls. The
Backpack keeps its senses beside that cache without changing the caller's object, in buffers reserved when the
model is given a static-cache generation config, so that the exported program decodes what `generate()` does.
"""

import pytest
import torch
from conftest import tiny_model
from transformers import GenerationConfig, StaticCache
from transformers.integrations.executorch import (
    TorchExportableModuleForDecoderOnlyLM,
    TorchExportableModuleWithStaticCache,
    convert_and_export_with_cache,
)

PROMPT = torch.tensor([[5, 9, 3, 77]])
NEW_TOKENS = 10


def exportable_model():
    """A tiny Backpack whose greedy continuation of PROMPT varies, set up as the export recipes ask."""
    model = tiny_model(9)
    model.generation_config = GenerationConfig(
        use_cache=True, cache_implementation="static", cache_config={"batch_size": 1, "max_cache_len": 24},
        pad_token_id=0, eos_token_id=None,
    )
    return model


def greedy_with(program: torch.export.ExportedProgram) -> torch.Tensor:
    """Greedy decoding one token per call, as ExecuTorch's runner (and transformers' `generate` helper) does."""
    module = program.module()
    sequence = PROMPT.clone()
    with torch.no_grad():
        for position in range(PROMPT.shape[1]):
            logits = module(input_ids=PROMPT[:, position : position + 1], cache_position=torch.tensor([position]))
        for _ in range(NEW_TOKENS):
            sequence = torch.cat([sequence, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            logits = module(input_ids=sequence[:, -1:], cache_position=torch.tensor([sequence.shape[1] - 1]))
    return sequence


def test_exported_programs_generate_what_generate_does():
    model = exportable_model()
    expected = model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert len(set(expected[0, PROMPT.shape[1] :].tolist())) >= 4  # a continuation that tests something
    exportable = TorchExportableModuleForDecoderOnlyLM(model)
    program = exportable.export(input_ids=PROMPT[:, :1], cache_position=torch.tensor([0]))
    assert torch.equal(greedy_with(program), expected)
    assert type(exportable.model.static_cache) is StaticCache  # the exporter's own cache keeps its class
    assert torch.equal(greedy_with(convert_and_export_with_cache(model)), expected)


def test_static_cache_wrapper_forward_equals_the_model_without_cache():
    """transformers' own check of the wrapper, eager: a whole prompt at once gives the uncached logits."""
    model = exportable_model()
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(9))
    wrapped = TorchExportableModuleWithStaticCache(model)
    with torch.no_grad():
        logits = wrapped(input_ids=ids, cache_position=torch.arange(9))
        torch.testing.assert_close(logits, model(ids, use_cache=False).logits)
        again = wrapped(input_ids=ids, cache_position=torch.arange(9))  # the wrapper restarts from its position
    torch.testing.assert_close(again, logits)


def test_sense_buffers_too_small_for_the_exporters_cache_are_named():
    model = exportable_model()
    model.backpack.reserve_sense_buffers(batch_size=1, max_cache_len=8)
    exportable = TorchExportableModuleForDecoderOnlyLM(model, batch_size=1, max_cache_len=24)
    with pytest.raises(Exception, match=r"sense buffers hold 1 rows of 8 positions.*reserve_sense_buffers\(1, 24\)"):
        exportable.export(input_ids=PROMPT[:, :1], cache_position=torch.tensor([0]))
