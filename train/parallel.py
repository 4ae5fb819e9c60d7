"""How the model is spread over the training processes: one process, DDP, or FSDP2 (``fully_shard``).

The topology comes from ``accelerate launch`` (train/accelerate_configs/): a config with ``distributed_type: FSDP``
and ``fsdp_version: 2`` shards, any other several-process config runs DDP. Accelerate builds FSDP only for
accelerators (on CPU processes it quietly falls back to DDP), so the trainer shards the model itself with
``torch.distributed.fsdp.fully_shard``, the same code on CPU (gloo) and GPU (NCCL): every ``_no_split_modules``
block (GPT-2's blocks, the Backpack's sense network) is one unit, the model the root. Accelerate then runs the
processes, data, mixed precision and accumulation as for data parallelism but never wraps the model
(:func:`consume_fsdp_request` takes the FSDP request away from it). :func:`check_parallelism` refuses a model that
does not match the plan (FSDP asked for and parameters not sharded, several processes and no DDP): never a silent
fallback.

Mixed precision is the one-GPU recipe everywhere: fp32 master weights and ``torch.autocast`` around the forward
(under FSDP the all-gathers are fp32 too, so that the numerics equal DDP's and one GPU's).

``--compile true`` compiles what the wrapper runs, never the wrapper: under DDP (and on one process) the inner
module, as one fullgraph graph of static shapes; under FSDP2 each unit's forward, as one graph each (FSDP2's
hooks run between units and are never traced: torch.compile refuses to trace them), with the root's glue
(embeddings, contextualization weights, the sense sum, the logits) eager.

Checkpoints under FSDP hold the same files as under DDP: the gathered full weights as ``model.safetensors`` and the
gathered full optimizer state as ``optimizer.bin`` (torch's layout, parameters by index; read back with
``torch.load(weights_only=True)``). Rank 0 writes and reads them; the tensors go to the other ranks by broadcast and
are re-sharded for this run's process count. So any checkpoint (one process, DDP, FSDP on any number of
processes) resumes under any topology, and nothing is unpickled.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, broadcast_object_list, parse_flag_from_env
from safetensors.torch import load_file, save_file

from backpack.files import write_bytes_atomically

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.bin"
# What `torch.compile` is given, everywhere: one graph (a graph break raises instead of splitting it silently) of
# static shapes (every training step has the same shape, so nothing recompiles after the first).
COMPILE_OPTIONS = {"backend": "inductor", "fullgraph": True, "dynamic": False}


class ParallelismError(ValueError):
    """The launch configuration asks for something this trainer does not run; the message names the setting."""


@dataclass(frozen=True)
class Parallelism:
    """The topology of a run: ``kind`` is ``single``, ``ddp`` or ``fsdp``."""

    kind: str
    processes: int
    machines: int = 1
    reshard_after_forward: bool = True
    unit_classes: tuple[str, ...] | None = None  # FSDP units by class name; None: the model's _no_split_modules

    @property
    def sharded(self) -> bool:
        return self.kind == "fsdp"

    def describe(self) -> str:
        """One line naming the parallelism, e.g. ``FSDP2, 2 processes, parameters sharded``."""
        count = f"{self.processes} process{'es' if self.processes > 1 else ''}"
        if self.machines > 1:
            count += f" on {self.machines} machines"
        if self.kind == "fsdp":
            return f"FSDP2, {count}, parameters sharded" + (" (one shard)" if self.processes == 1 else "")
        if self.kind == "ddp":
            return f"DDP, {count}"
        return count


def _env_flag(name: str, default: str = "false") -> str:
    return os.environ.get(name, default).strip().lower()


def _refuse_unsupported_fsdp_settings() -> None:
    """FSDP settings of the accelerate config that this trainer does not apply: an error naming each, not a silence.

    FSDP1-only keys (sharding strategy, prefetch, use_orig_params, sync_module_states: every process builds the same
    weights from the seed) do not apply to FSDP2, as in Accelerate's own FSDP2.
    """
    refused = {
        "FSDP_OFFLOAD_PARAMS": ("fsdp_offload_params: true", "parameters stay on the training device"),
        "FSDP_CPU_RAM_EFFICIENT_LOADING": ("fsdp_cpu_ram_efficient_loading: true",
                                           "every process builds the model from the seed"),
        "FSDP_ACTIVATION_CHECKPOINTING": ("fsdp_activation_checkpointing: true",
                                          "use the trainer's --gradient_checkpointing true instead"),
    }
    for name, (setting, why) in refused.items():
        if _env_flag(name) == "true":
            raise ParallelismError(f"the accelerate config sets {setting}, which this trainer does not apply ({why}); "
                                   "remove it")
    state_dict_type = os.environ.get("FSDP_STATE_DICT_TYPE", "FULL_STATE_DICT").strip().upper()
    if state_dict_type != "FULL_STATE_DICT":
        raise ParallelismError(
            f"the accelerate config sets fsdp_state_dict_type: {state_dict_type}; checkpoints hold the gathered full "
            "weights and optimizer state (they resume on any number of processes and load without pickle): set "
            "fsdp_state_dict_type: FULL_STATE_DICT or leave it out")
    if os.environ.get("FSDP_IGNORED_MODULES"):
        raise ParallelismError("the accelerate config sets fsdp_ignored_modules, which this trainer does not apply; "
                               "remove it")


def _fsdp_units() -> tuple[str, ...] | None:
    """The FSDP unit classes the config names (``fsdp_transformer_layer_cls_to_wrap``), or None: the model's."""
    policy = os.environ.get("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP").strip().upper()
    if policy == "NO_WRAP":
        return ()
    if policy != "TRANSFORMER_BASED_WRAP":
        raise ParallelismError(f"the accelerate config sets fsdp_auto_wrap_policy: {policy}; this trainer shards by "
                               "blocks: set TRANSFORMER_BASED_WRAP (or NO_WRAP: the whole model is one unit)")
    names = os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").strip()
    return tuple(name.strip() for name in names.split(",") if name.strip()) or None


def consume_fsdp_request(state: PartialState) -> Parallelism:
    """The run's parallelism, from the launch environment; takes an FSDP request away from Accelerate.

    Call it before the :class:`~accelerate.Accelerator` is built: ``ACCELERATE_USE_FSDP`` (set by ``accelerate
    launch`` for an FSDP config) is removed from this process's environment so that Accelerate runs plain data
    parallel processes and leaves the model to :func:`wrap_model`.

    Raises:
        ParallelismError: an FSDP setting this trainer does not run (FSDP1, parameter offload ...), FSDP without
            ``accelerate launch``, or a DeepSpeed / Megatron-LM config.
    """
    for name, what in (("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"), ("ACCELERATE_USE_MEGATRON_LM", "Megatron-LM")):
        if parse_flag_from_env(name):
            raise ParallelismError(f"the accelerate config asks for {what}; this trainer runs one process, DDP or "
                                   "FSDP2 (train/accelerate_configs/)")
    backend = os.environ.get("ACCELERATE_DYNAMO_BACKEND", "no").strip().lower()
    if backend not in ("", "no"):
        raise ParallelismError(f"the accelerate config sets dynamo_backend: {backend}; Accelerate would compile the "
                               "DDP wrapper, which cannot be traced: remove it and pass --compile true")
    machines = max(1, state.num_processes // int(os.environ.get("LOCAL_WORLD_SIZE", state.num_processes)))
    if not parse_flag_from_env("ACCELERATE_USE_FSDP"):
        kind = "single" if state.distributed_type == DistributedType.NO else "ddp"
        return Parallelism(kind, state.num_processes, machines)
    version = os.environ.get("FSDP_VERSION", "1").strip()
    if version != "2":
        raise ParallelismError(f"the accelerate config asks for FSDP version {version} (fsdp_version: {version}); this "
                               "trainer runs FSDP2 only: set fsdp_version: 2 (see train/accelerate_configs/fsdp.yaml)")
    _refuse_unsupported_fsdp_settings()
    reshard = _env_flag("FSDP_RESHARD_AFTER_FORWARD", "true")
    if reshard not in ("true", "false"):
        raise ParallelismError(f"fsdp_reshard_after_forward must be true or false for FSDP2, got {reshard!r}")
    if state.distributed_type == DistributedType.NO:
        raise ParallelismError("FSDP needs a process group: start the trainer with `accelerate launch --config_file "
                               "train/accelerate_configs/fsdp.yaml ...` (fsdp_cpu.yaml for CPU processes)")
    units = _fsdp_units()
    del os.environ["ACCELERATE_USE_FSDP"]
    return Parallelism("fsdp", state.num_processes, machines, reshard_after_forward=reshard == "true",
                       unit_classes=units)


def plan_of(accelerator: Accelerator) -> Parallelism:
    """One process or DDP, as ``accelerator`` was launched (FSDP is only ever what :func:`consume_fsdp_request`
    found)."""
    kind = "single" if accelerator.distributed_type == DistributedType.NO else "ddp"
    return Parallelism(kind, accelerator.num_processes)


# --- wrapping --------------------------------------------------------------------------------------------------


def fsdp_units(model: torch.nn.Module, plan: Parallelism) -> list[torch.nn.Module]:
    """The sub-modules that become FSDP units of their own (the root is one as well), in module order."""
    names = plan.unit_classes if plan.unit_classes is not None else tuple(getattr(model, "_no_split_modules", ()))
    units = [module for module in model.modules() if module is not model and type(module).__name__ in names]
    missing = sorted(set(names) - {type(module).__name__ for module in units})
    if missing:
        raise ParallelismError(f"fsdp_transformer_layer_cls_to_wrap names {', '.join(missing)}, which "
                               f"{type(model).__name__} does not have")
    return units


def shard_model(model: torch.nn.Module, plan: Parallelism, device: torch.device, compile: bool = False
                ) -> torch.nn.Module:
    """Apply FSDP2 to ``model`` in place (units, then the root) on a 1-D mesh of all processes; returns it.

    With ``compile``, each unit's ``forward`` is compiled first, so FSDP2's hooks (around ``forward``) stay outside
    the graphs. Tied weights stay tied: a Backpack's word embedding, its aliases and the output layer are one
    parameter of the root unit, sharded once.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model.to(device)
    mesh = init_device_mesh(device.type, (plan.processes,))
    units = fsdp_units(model, plan)
    if compile:
        # All units share one code object (transformers' checkpointing-layer forward) and each may be specialised
        # (the Backpack scales attention by 1 / layer): one graph per unit in training and one in evaluation.
        expect_graphs(2 * len(units))
    for unit in units:
        if compile:
            unit.forward = torch.compile(unit.forward, **COMPILE_OPTIONS)
        fully_shard(unit, mesh=mesh, reshard_after_forward=plan.reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=plan.reshard_after_forward)
    return model


def autocast_forward(accelerator: Accelerator, model: torch.nn.Module) -> None:
    """Run ``model``'s forward under the run's autocast (bf16 / fp16), as Accelerate does for a model it prepares."""
    if not accelerator.native_amp:
        return
    forward = model.forward

    def forward_in_autocast(*args, **kwargs):
        with accelerator.autocast():
            return forward(*args, **kwargs)

    model.forward = forward_in_autocast


def wrap_model(accelerator: Accelerator, model: torch.nn.Module, plan: Parallelism, compile: bool
               ) -> torch.nn.Module:
    """FSDP: shard ``model`` (and compile its units), before its optimizer is built. Otherwise nothing: the model
    goes through ``accelerator.prepare`` and then :func:`compile_inner`."""
    if not plan.sharded:
        return model
    if accelerator.mixed_precision == "fp16":
        raise ParallelismError("--mixed_precision fp16 under FSDP: its loss scaler would not agree across shards; use "
                               "bf16")
    model = shard_model(model, plan, accelerator.device, compile=compile)
    autocast_forward(accelerator, model)
    return model


def expect_graphs(count: int) -> None:
    """Let dynamo keep ``count`` graphs of one function, and fail beyond that: past its limit it would run the
    function eagerly from then on, with only a warning."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, count)
    torch._dynamo.config.fail_on_recompile_limit_hit = True


def compile_inner(accelerator: Accelerator, model: torch.nn.Module) -> None:
    """Compile the module a prepared (DDP or bare) model runs, never the DDP wrapper, which dynamo cannot trace."""
    expect_graphs(2)  # training and evaluation
    accelerator.unwrap_model(model).compile(**COMPILE_OPTIONS)


def prepare_for_training(accelerator: Accelerator, plan: Parallelism, compile: bool, model: torch.nn.Module,
                         optimizer: torch.optim.Optimizer, *others) -> tuple:
    """``accelerator.prepare(model, optimizer, *others)``, compiled as asked, checked against ``plan``.

    An FSDP model (:func:`wrap_model`) and its optimizer stay out of Accelerate, which would wrap the model in DDP
    on CPU processes; only ``others`` (loaders, scheduler) are prepared.
    """
    if plan.sharded:
        others = accelerator.prepare(*others) if others else ()
        prepared = (model, optimizer, *(others if isinstance(others, tuple) else (others,)))
    else:
        prepared = accelerator.prepare(model, optimizer, *others)
        if compile:
            compile_inner(accelerator, prepared[0])
    check_parallelism(prepared[0], plan)
    return prepared


def is_sharded(model: torch.nn.Module, processes: int) -> bool:
    """Whether every parameter is a DTensor sharded over ``processes`` ranks (FSDP2)."""
    from torch.distributed.tensor import DTensor, Shard

    parameters = list(model.parameters())
    return bool(parameters) and all(
        isinstance(p, DTensor) and p.device_mesh.size() == processes and isinstance(p.placements[0], Shard)
        for p in parameters)


def check_parallelism(model: torch.nn.Module, plan: Parallelism) -> None:
    """Refuse a prepared model that is not what the plan says (an FSDP request that did not shard, a run of
    several processes without DDP): never a silent fallback."""
    if plan.sharded and not is_sharded(model, plan.processes):
        raise RuntimeError(f"the launch config asks for FSDP over {plan.processes} process(es) but the model's "
                           "parameters are not sharded; stopping rather than training unsharded")
    if not plan.sharded and plan.kind == "ddp" and not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        raise RuntimeError(f"{plan.processes} processes but the model is not wrapped in DDP; stopping rather than "
                           "training unsynchronised copies")


@contextmanager
def micro_step(accelerator: Accelerator, model: torch.nn.Module) -> Iterator[None]:
    """``accelerator.accumulate(model)``, and for an FSDP2 model its gradient reduction only on the step's last
    micro-batch (the other ones accumulate unsharded gradients locally, as DDP's ``no_sync`` does)."""
    from torch.distributed.fsdp import FSDPModule

    with accelerator.accumulate(model):
        if isinstance(model, FSDPModule):
            model.set_requires_gradient_sync(accelerator.sync_gradients)
        yield


# --- full state dicts of a sharded model -------------------------------------------------------------------------

def _full_options(**extra):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **extra)


def is_fsdp(model: torch.nn.Module) -> bool:
    """Whether ``model`` is an FSDP2 model (:func:`shard_model`)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def tied_aliases(model: torch.nn.Module) -> set[str]:
    """State-dict names that are tied to another name (stored once, under the name they are tied to)."""
    return set(getattr(model, "all_tied_weights_keys", None) or {})


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The gathered full weights on rank 0 (CPU tensors), ``{}`` on the other ranks. Every process must call it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_options())


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The gathered optimizer state on rank 0 in ``optimizer.state_dict()``'s layout (parameters by index, in the
    order of the parameter groups), ``{}`` on the other ranks. Every process must call it."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    by_name = get_optimizer_state_dict(model, optimizer, options=_full_options())
    if not by_name:
        return {}
    index = {name: i for i, name in enumerate(name for group in by_name["param_groups"] for name in group["params"])}
    return {"state": {index[name]: value for name, value in by_name["state"].items()},
            "param_groups": [{**group, "params": [index[name] for name in group["params"]]}
                             for group in by_name["param_groups"]]}


def _parameter_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names DCP gives the optimizer's parameters, in index order (each tied parameter under one name)."""
    names = {id(p): name for name, p in model.named_parameters()}  # a tied parameter appears once, first name
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _by_name(by_index: dict, names: list[str], folder: str) -> dict:
    """An ``optimizer.state_dict()`` (parameters by index) keyed by parameter names instead, as DCP takes it."""
    count = sum(len(group["params"]) for group in by_index["param_groups"])
    if count != len(names):
        raise ValueError(f"{folder}/{OPTIMIZER_FILE} holds the state of {count} parameters, this model has "
                         f"{len(names)}")
    return {"state": {names[i]: value for i, value in by_index["state"].items()},
            "param_groups": [{**group, "params": [names[i] for i in group["params"]]}
                             for group in by_index["param_groups"]]}


def model_for_export(accelerator: Accelerator, model: torch.nn.Module) -> tuple[torch.nn.Module, dict]:
    """The module to call ``save_pretrained`` on and the weights to give it. Every process must call this.

    For an FSDP model: the gathered weights (rank 0; each tied tensor once, as Accelerate stores them) and an empty
    (meta-device) instance of the model's own class, since ``fully_shard`` swaps in a class of torch's, whose files
    ``save_pretrained`` would copy as the model's code.
    """
    if not is_fsdp(model):
        return accelerator.unwrap_model(model), accelerator.get_state_dict(model)
    from torch.distributed.fsdp import FSDPModule

    aliases = tied_aliases(model)
    weights = {name: tensor for name, tensor in full_model_state(model).items() if name not in aliases}
    own_class = next(cls for cls in type(model).__mro__ if not issubclass(cls, FSDPModule))
    with torch.device("meta"):
        stand_in = own_class(model.config)
    stand_in.generation_config = model.generation_config
    return stand_in, weights


def save_sharded_state(accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                       folder: str) -> None:
    """Write the gathered weights (``model.safetensors``) and optimizer state (``optimizer.bin``) of an FSDP model
    into ``folder`` from rank 0, in the files and layout Accelerate writes for DDP. Every process must call it."""
    weights = full_model_state(model)
    optimizer_state = full_optimizer_state(model, optimizer)
    if accelerator.is_main_process:
        aliases = tied_aliases(model)
        save_file({name: tensor.contiguous() for name, tensor in weights.items() if name not in aliases},
                  os.path.join(folder, MODEL_FILE), metadata={"format": "pt"})
        _save_torch(optimizer_state, os.path.join(folder, OPTIMIZER_FILE))
    accelerator.wait_for_everyone()


def _save_torch(value: dict, path: str) -> None:
    import io

    buffer = io.BytesIO()
    torch.save(value, buffer)
    write_bytes_atomically(path, buffer.getvalue())


def load_sharded_state(accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                       folder: str) -> None:
    """Load ``model.safetensors`` and ``optimizer.bin`` of a checkpoint (saved under any topology) into an FSDP
    model and its optimizer: rank 0 reads them (safetensors, ``torch.load(weights_only=True)``), every rank gets its
    shards by broadcast. Every process must call it.

    Raises:
        ValueError: the files do not hold this model's parameters (a name missing or unexpected).
    """
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    weights, by_name, error = {}, {}, None
    if accelerator.is_main_process:
        try:
            weights = load_file(os.path.join(folder, MODEL_FILE))
            by_index = torch.load(os.path.join(folder, OPTIMIZER_FILE), weights_only=True, map_location="cpu")
            by_name = _by_name(by_index, _parameter_names(model, optimizer), folder)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as failure:
            error = str(failure)
    if (error := broadcast_object_list([error])[0]) is not None:  # every rank stops, none waits in a broadcast
        raise ValueError(error)
    options = _full_options(broadcast_from_rank0=True, strict=False)
    result = set_model_state_dict(model, weights, options=options)
    aliases = tied_aliases(model)
    problems = [name for name in result.missing_keys if name not in aliases] + list(result.unexpected_keys)
    if problems:
        raise ValueError(f"{folder}/{MODEL_FILE} does not match the model: {', '.join(sorted(problems)[:4])}")
    set_optimizer_state_dict(model, optimizer, by_name, options=options)


class ShardedTrainingState:
    """An FSDP run's model and optimizer as a checkpoint holds them: gathered full tensors, written and read by
    rank 0 (train/checkpointing.py calls :meth:`save` and :meth:`load` on every process)."""

    def __init__(self, accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.accelerator, self.model, self.optimizer = accelerator, model, optimizer

    def save(self, folder: str) -> None:
        save_sharded_state(self.accelerator, self.model, self.optimizer, folder)

    def load(self, folder: str) -> None:
        load_sharded_state(self.accelerator, self.model, self.optimizer, folder)
