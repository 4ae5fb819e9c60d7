"""Load a model and its tokenizer by Hub id or local folder, without running the checkpoint's own code.

Every entry point of the package (``backpack.load_model``, the ``backpack`` command, ``train/evaluate.py``, the
demo, ``hub_upload.py``'s reader) loads through :func:`load_model`:

* The raw ``config.json`` is read first (a local file, or ``huggingface_hub.hf_hub_download``, which honours
  ``HF_HUB_OFFLINE`` and ``HF_HUB_CACHE``); nothing of the checkpoint is imported to do so.
* A Backpack configuration (``model_type: backpack-gpt2``, or the published ``model_type: gpt2`` whose
  ``architectures`` / ``auto_map`` name ``BackpackGPT2LMHeadModel`` / ``modeling_backpack_gpt2``) is loaded with
  the INSTALLED ``BackpackGPT2LMHeadModel``. ``trust_remote_code=True`` would import the repo's own
  ``modeling_backpack_gpt2.py`` instead: arbitrary code, and for ``stanfordnlp/backpack-gpt2`` the 2023 file that
  fails on transformers 5.
* Any other configuration (the trainer's GPT-2 baseline) is loaded with ``AutoModelForCausalLM`` and
  ``trust_remote_code=False``.
* Weights that are missing, left over or of the wrong shape are refused with their names: ``from_pretrained``
  would initialise them at random and only log a warning.
* Broken checkpoints are refused before they are used, naming the file and the key or tensor: a ``config.json``
  whose sizes are not positive integers, or whose parameters would not fit in the memory this machine has
  (estimated from the sizes, before anything is allocated); weight files that are truncated or unreadable, or
  that store a weight as integers or booleans (``from_pretrained`` would cast them to float silently); weights
  holding NaN or infinity.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from configuration_backpack_gpt2 import GPT2_VOCAB_SIZE, is_backpack_config

CONFIG_FILE = "config.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
# Buffers of old GPT-2 checkpoints that transformers rebuilds itself (its GPT-2 ignores them the same way).
IGNORED_UNEXPECTED = re.compile(r"attn\.(masked_)?bias$")


class ModelLoadError(ValueError):
    """The model can't be loaded: the message names the path, Hub id, file or weights at fault."""


@contextlib.contextmanager
def no_loading_progress_bar() -> Iterator[None]:
    """Within this block, ``from_pretrained`` draws no "Loading weights" bar (download bars stay).

    transformers draws that bar on every load: on a CPU-sized model it flashes by on every command and fills logs.
    Done with transformers' own tqdm hook, chained to any hook already set and restored afterwards.
    """
    from transformers.utils import logging as hf_logging

    previous = getattr(hf_logging, "_tqdm_hook", None)  # no public getter: keep whatever the user set

    def hook(factory, args, kwargs):
        if kwargs.get("desc") == "Loading weights":
            kwargs = {**kwargs, "disable": True}
        return previous(factory, args, kwargs) if previous is not None else factory(*args, **kwargs)

    hf_logging.set_tqdm_hook(hook)
    try:
        yield
    finally:
        hf_logging.set_tqdm_hook(previous)


def _is_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _hub_cache(cache_dir: str | os.PathLike | None) -> str:
    from huggingface_hub import constants

    return str(cache_dir or constants.HF_HUB_CACHE)


def _looks_like_hub_id(name: str) -> bool:
    """``owner/name`` or ``name`` as the Hub spells repo ids (a relative path of more parts is never one)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if name.startswith((".", "/", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _hub_file(repo_id: str, filename: str, *, revision: str | None, token: str | bool | None,
              cache_dir: str | os.PathLike | None, required: bool) -> Path | None:
    """A file of a Hub model repo through the Hub cache; None when an optional file is not there.

    Raises:
        ModelLoadError: a required file that can't be had, saying why (offline, no such repo / revision / file).
    """
    from huggingface_hub import errors as hub_errors
    from huggingface_hub import hf_hub_download

    where = f"the Hub model {repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, token=token, cache_dir=cache_dir))
    except hub_errors.LocalEntryNotFoundError as error:  # not cached, and the Hub was not (or could not be) asked
        if not required:
            return None
        if _is_offline():
            raise ModelLoadError(
                f"{repo_id!r} is not a local folder, and {filename} of {where} is not in the Hub cache "
                f"({_hub_cache(cache_dir)}) while HF_HUB_OFFLINE is set: download it once with network access "
                f"(`hf download {repo_id}`), point HF_HUB_CACHE at a cache that holds it, or unset HF_HUB_OFFLINE"
            ) from error
        raise ModelLoadError(f"{repo_id!r} is not a local folder, and {filename} of {where} could neither be "
                             f"fetched from the Hub nor found in the Hub cache ({_hub_cache(cache_dir)}): {error}"
                             ) from error
    except hub_errors.EntryNotFoundError as error:
        if not required:
            return None
        raise ModelLoadError(f"{where} has no {filename}") from error
    except hub_errors.RevisionNotFoundError as error:
        raise ModelLoadError(f"{where}: no such revision ({error})") from error
    except hub_errors.RepositoryNotFoundError as error:
        raise ModelLoadError(f"{repo_id!r} is neither a local folder nor a model repo on the Hub that this token "
                             f"can see (private or gated repos need token=...): {error}") from error
    except hub_errors.HfHubHTTPError as error:
        raise ModelLoadError(f"could not fetch {filename} of {where}: {error}") from error


def read_config(name_or_path: str | os.PathLike, *, revision: str | None = None, token: str | bool | None = None,
                cache_dir: str | os.PathLike | None = None) -> dict:
    """The raw ``config.json`` of a local folder or a Hub model repo, read as JSON (no code is imported).

    Raises:
        ModelLoadError: the path does not exist or is not a folder, the folder has no config.json, the Hub id is
            not reachable (offline and not cached, unknown repo or revision), or the file is not JSON.
    """
    name = os.fspath(name_or_path)
    folder = Path(name).expanduser()
    if folder.exists():
        if not folder.is_dir():
            raise ModelLoadError(f"{name!r} is a file; give the model folder (config.json + weights)")
        path = folder / CONFIG_FILE
        if not path.is_file():
            hint = f"; the trainer's export inside it is {folder / 'model'}" if (folder / "model" / CONFIG_FILE
                                                                                   ).is_file() else ""
            raise ModelLoadError(f"model folder {name!r} has no {CONFIG_FILE}{hint}")
    elif _looks_like_hub_id(name):
        path = _hub_file(name, CONFIG_FILE, revision=revision, token=token, cache_dir=cache_dir, required=True)
    else:
        raise ModelLoadError(f"model folder {name!r} does not exist (and it is not a Hub id of the form OWNER/NAME)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelLoadError(f"can't read {path}: {error}") from error
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path} is not a configuration (a JSON object)")
    return config


# --- checks of a checkpoint before it is used ------------------------------------------------------------------

# The sizes a GPT-2 / Backpack configuration must give as positive integers (n_inner may also be null).
SIZE_KEYS = ("vocab_size", "n_embd", "n_layer", "n_head", "n_positions")
BACKPACK_SIZE_KEYS = ("num_senses", "sense_intermediate_scale")
FLOATING_SAFETENSORS_DTYPES = re.compile(r"B?F\d+(_\w+)?")  # F16, BF16, F32, F64, F8_E4M3 ...


def _describe_value(value) -> str:
    kind = {bool: "a boolean", str: "a string", float: "a float", list: "a list", dict: "an object",
            type(None): "null"}.get(type(value), type(value).__name__)
    return f"{json.dumps(value)[:40]} ({kind})" if kind != "int" else str(value)


def check_config_sizes(config: dict, where: str) -> None:
    """Refuse sizes that are not positive integers (``"12"``, ``1e9``, ``-5``, ``true``), naming file and key.

    Raises:
        ModelLoadError: e.g. ``.../config.json: n_layer must be a positive integer, got "12" (a string)``.
    """
    keys = SIZE_KEYS + (BACKPACK_SIZE_KEYS if is_backpack_config(config) else ())
    for key in keys:
        if key not in config:
            continue  # the configuration class's default applies
        value = config[key]
        if not (type(value) is int and value >= 1):
            raise ModelLoadError(f"{where}: {key} must be a positive integer, got {_describe_value(value)}")
    inner = config.get("n_inner")
    if inner is not None and not (type(inner) is int and inner >= 1):
        raise ModelLoadError(f"{where}: n_inner must be a positive integer or null, got {_describe_value(inner)}")
    embd = config.get("n_embd", 768)
    divisors = ("n_head", "num_senses") if is_backpack_config(config) else ("n_head",)
    for key in divisors:
        if embd % config.get(key, {"n_head": 12, "num_senses": 16}[key]):
            raise ModelLoadError(f"{where}: n_embd ({embd}) must be divisible by {key} ({config.get(key)})")


def estimate_parameters(config: dict) -> int:
    """Parameters of a GPT-2 or Backpack configuration (tied embeddings counted once), from its sizes alone.

    GPT-2: ``V·d + P·d + L·(4d² + 2d·i + 9d + i) + 2d`` with ``i = n_inner or 4d``; a Backpack adds its sense
    network ``8d² + d·s·d + s·d·k·d`` (its block's FFN is 4d wide; s the intermediate scale, k the senses) and
    the weight network ``2d²``, plus biases and layer norms.
    """
    vocab, embd = config.get("vocab_size", GPT2_VOCAB_SIZE), config.get("n_embd", 768)
    layers, positions = config.get("n_layer", 12), config.get("n_positions", 1024)
    inner = config.get("n_inner") or 4 * embd
    count = vocab * embd + positions * embd + layers * (4 * embd * embd + 2 * embd * inner + 9 * embd + inner)
    count += 2 * embd
    if is_backpack_config(config):
        senses, scale = config.get("num_senses", 16), config.get("sense_intermediate_scale", 4)
        count += 8 * embd * embd + 4 * embd + 7 * embd  # the sense network's block (a 4d FFN) and layer norms
        count += embd * scale * embd + scale * embd + scale * embd * senses * embd + senses * embd  # final FFN
        count += 2 * embd * embd + 2 * embd  # the weight network's queries and keys
    return count


def count_parameters(model: torch.nn.Module) -> int:
    """The model's parameters, tied weights counted once (as the paper counts them): ``parameters()`` yields each
    tensor once."""
    return sum(parameter.numel() for parameter in model.parameters())


def available_memory() -> int | None:
    """Bytes of memory this machine can still give (``MemAvailable``), or None where that can't be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _bytes(size: float) -> str:
    """A memory size in decimal units: ``3.2 GB``, ``850 MB``."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{size:.0f} bytes"


def check_memory(config: dict, where: str, dtype: torch.dtype | None = None) -> None:
    """Refuse a configuration whose parameters alone need more memory than this machine has available.

    Raises:
        ModelLoadError: with the estimate, the memory available and the sizes behind them.
    """
    available = available_memory()
    if available is None:
        return
    parameters = estimate_parameters(config)
    element = (dtype or torch.float32).itemsize
    if parameters * element > available:
        sizes = ", ".join(f"{key} {config[key]}" for key in SIZE_KEYS + BACKPACK_SIZE_KEYS if key in config)
        raise ModelLoadError(f"{where}: these sizes ({sizes}) make about {parameters:,} parameters, "
                             f"{_bytes(parameters * element)} in {str(dtype or torch.float32).split('.')[-1]}, "
                             f"more than the {_bytes(available)} of memory available on this machine")


def _weight_files(name: str, *, revision: str | None, token: str | bool | None,
                  cache_dir: str | os.PathLike | None) -> list[Path]:
    """The weight files ``from_pretrained`` will read (safetensors first, as it prefers them), shards included."""
    local = Path(name).expanduser()

    def fetch(filename: str) -> Path | None:
        if local.is_dir():
            return local / filename if (local / filename).is_file() else None
        return _hub_file(name, filename, revision=revision, token=token, cache_dir=cache_dir, required=False)

    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (path := fetch(single)) is not None:
            return [path]
        if (path := fetch(index)) is not None:
            try:
                shards = sorted(set(json.loads(path.read_text(encoding="utf-8"))["weight_map"].values()))
            except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as error:
                raise ModelLoadError(f"can't read the shard index {path}: {error}") from error
            files = []
            for shard in shards:
                if (shard_path := fetch(shard)) is None:
                    raise ModelLoadError(f"{path} lists the shard {shard}, which {name!r} does not have")
                files.append(shard_path)
            return files
    return []


def _tensor_dtypes(path: Path) -> dict[str, tuple[str, bool]]:
    """Every tensor's stored dtype and whether it is floating point, from the file's header (safetensors) or its
    archive (torch.save, memory-mapped: no tensor data is read).

    Raises:
        ModelLoadError: a truncated or unreadable file, naming it.
    """
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                dtypes = {key: handle.get_slice(key).get_dtype() for key in handle.keys()}
        except Exception as error:  # SafetensorError (not exported as a class), OSError
            raise ModelLoadError(f"can't read the weights file {path} (truncated or not a safetensors file): "
                                 f"{error}") from error
        return {key: (dtype, bool(FLOATING_SAFETENSORS_DTYPES.fullmatch(dtype))) for key, dtype in dtypes.items()}
    try:  # weights_only: tensors and plain containers, never arbitrary pickled objects
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # the legacy (pre-zip) format
    except Exception as error:  # a truncated zip archive, a pickle that weights_only refuses, ...
        raise ModelLoadError(f"can't read the weights file {path} (truncated, or not a torch.save file of "
                             f"tensors): {error}") from error
    if not isinstance(state, dict):
        raise ModelLoadError(f"the weights file {path} holds a {type(state).__name__}, not a state dict of tensors")
    return {str(key): (str(value.dtype).removeprefix("torch."), value.is_floating_point())
            if isinstance(value, torch.Tensor) else (type(value).__name__, False) for key, value in state.items()}


def check_weight_files(files: list[Path]) -> None:
    """Refuse unreadable weight files and weights stored as anything but floating point, naming file and tensor.

    ``from_pretrained`` casts an int64 or bool tensor to the model's float dtype without a word; such a weight is
    a broken checkpoint, not a model. (Old GPT-2 attention-mask buffers, which transformers rebuilds, are skipped.)
    """
    for path in files:
        for key, (dtype, floating) in _tensor_dtypes(path).items():
            if not floating and not IGNORED_UNEXPECTED.search(key):
                raise ModelLoadError(f"{path}: tensor {key} is stored as {dtype}; weights must be floating point "
                                     "(a broken or foreign checkpoint)")


def check_finite_weights(model: torch.nn.Module, files: list[Path], where: str) -> None:
    """Refuse weights holding NaN or infinity (after loading, in the dtype asked for), naming the tensor."""
    source = str(files[0]) if len(files) == 1 else where
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            counts = [f"{int(count):,} {label}" for count, label in ((torch.isnan(tensor).sum(), "NaN"),
                                                                      (torch.isinf(tensor).sum(), "infinite")) if count]
            raise ModelLoadError(f"{source}: weight {name} holds {' and '.join(counts)} value(s) "
                                 f"({str(tensor.dtype).removeprefix('torch.')}); weights must be finite")


def few(names: list[str], count: int = 5) -> str:
    """The first ``count`` names and how many more, for messages (``none`` for no name)."""
    return ", ".join(names[:count]) + (f" and {len(names) - count} more" if len(names) > count else "") or "none"


def _check_loading_info(info: dict, where: str) -> None:
    """Refuse weights that ``from_pretrained`` initialised at random, dropped, or could not fit.

    Tied weights and the published checkpoint's aliases (``lm_head.weight`` = ``wte.weight`` = ``word_embeddings``)
    are not reported as missing by ``from_pretrained``, so any name left here is a real gap.
    """
    missing = sorted(info.get("missing_keys") or ())
    unexpected = sorted(key for key in info.get("unexpected_keys") or () if not IGNORED_UNEXPECTED.search(key))
    mismatched = sorted(_describe_mismatch(entry) for entry in info.get("mismatched_keys") or ())
    if missing or unexpected or mismatched:
        problems = [f"{label} {few(names)}" for label, names in
                    (("missing", missing), ("wrong shape", mismatched), ("unexpected", unexpected)) if names]
        raise ModelLoadError(f"the weights in {where} do not fit its config.json: {'; '.join(problems)}")


def _describe_mismatch(entry) -> str:
    """``key (checkpoint shape vs model shape)`` from a mismatched_keys entry (a tuple, or a bare key)."""
    if isinstance(entry, (tuple, list)) and len(entry) == 3:
        key, checkpoint_shape, model_shape = entry
        return f"{key} (checkpoint {tuple(checkpoint_shape)} vs config {tuple(model_shape)})"
    return str(entry)


def _check_local_weights(folder: Path) -> None:
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise ModelLoadError(f"model folder {str(folder)!r} has a {CONFIG_FILE} but no weights "
                             f"({', '.join(WEIGHT_FILES)})")


def load_pretrained_model(
    name_or_path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    attn_implementation: str | None = None,
    config: dict | None = None,
    require_backpack: bool = False,
):
    """The model of a local folder or Hub repo, in eval mode on the CPU (see :func:`load_model`).

    Args:
        config: The raw config.json when the caller has read it already (:func:`read_config`).
        require_backpack: Refuse a configuration that is not a Backpack.

    Raises:
        ModelLoadError: see :func:`load_model`.
    """
    name = os.fspath(name_or_path)
    raw = config if config is not None else read_config(name, revision=revision, token=token, cache_dir=cache_dir)
    backpack = is_backpack_config(raw)
    if require_backpack and not backpack:
        raise ModelLoadError(f"{name}'s {CONFIG_FILE} is not a Backpack GPT-2 configuration (model_type "
                             f"{raw.get('model_type')!r}, architectures {raw.get('architectures')})")
    local = Path(name).expanduser()
    where = str(local / CONFIG_FILE) if local.is_dir() else f"{CONFIG_FILE} of the Hub model {name!r}"
    check_config_sizes(raw, where)
    check_memory(raw, where, dtype)  # before from_pretrained allocates anything
    if local.is_dir():
        _check_local_weights(local)
    files = _weight_files(name, revision=revision, token=token, cache_dir=cache_dir)
    check_weight_files(files)

    kwargs: dict = dict(revision=revision, token=token, cache_dir=cache_dir, output_loading_info=True,
                        # mismatched shapes are reported by name below instead of a RuntimeError
                        ignore_mismatched_sizes=True)
    if dtype is not None:
        kwargs["dtype"] = dtype
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        if backpack:
            # The installed class: the checkpoint's own modeling file is never imported.
            from modeling_backpack_gpt2 import BackpackGPT2LMHeadModel

            with no_loading_progress_bar():
                model, info = BackpackGPT2LMHeadModel.from_pretrained(name, **kwargs)
        else:
            from transformers import AutoModelForCausalLM

            with no_loading_progress_bar():
                model, info = AutoModelForCausalLM.from_pretrained(name, trust_remote_code=False, **kwargs)
    except ModelLoadError:
        raise
    except OSError as error:  # a missing weights file, an unreachable Hub
        offline = " (HF_HUB_OFFLINE is set: only the Hub cache is read)" if _is_offline() else ""
        raise ModelLoadError(f"can't load the weights of {name!r}{offline}: {error}") from error
    except ValueError as error:  # e.g. an unknown model_type whose code only the repo has
        raise ModelLoadError(f"can't load {name!r} without running its own code (trust_remote_code is never "
                             f"used for models that are not Backpacks): {error}") from error
    _check_loading_info(info, name)
    check_finite_weights(model, files, name)
    return model.eval()


def _has_tokenizer(name: str, *, revision: str | None, token: str | bool | None,
                   cache_dir: str | os.PathLike | None) -> bool:
    local = Path(name).expanduser()
    if local.is_dir():
        return any((local / file).is_file() for file in TOKENIZER_FILES)
    return any(_hub_file(name, file, revision=revision, token=token, cache_dir=cache_dir, required=False) is not None
               for file in TOKENIZER_FILES)


def load_tokenizer(name_or_path: str | os.PathLike, *, model_max_length: int | None = None,
                   revision: str | None = None, token: str | bool | None = None,
                   cache_dir: str | os.PathLike | None = None, config=None):
    """The repo's own tokenizer if it has one, else GPT-2's (built offline); EOS doubles as pad when none is set.

    The published ``stanfordnlp/backpack-gpt2`` ships no tokenizer: it uses GPT-2's unchanged.

    Args:
        config: The model's loaded configuration. Without it, ``AutoTokenizer`` reads config.json itself and, for a
            ``model_type`` that transformers does not know (``backpack-gpt2``), falls back to a bare configuration
            with a warning.

    Raises:
        ModelLoadError: the repo's tokenizer files exist but do not load without its own code.
    """
    name = os.fspath(name_or_path)
    if _has_tokenizer(name, revision=revision, token=token, cache_dir=cache_dir):
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(name, revision=revision, token=token, cache_dir=cache_dir,
                                                      trust_remote_code=False,
                                                      **({"config": config} if config is not None else {}))
        except (OSError, ValueError) as error:
            raise ModelLoadError(f"the tokenizer files of {name!r} do not load: {error}") from error
    else:
        from .tokenizer import gpt2_tokenizer

        tokenizer = gpt2_tokenizer(**({"model_max_length": model_max_length} if model_max_length else {}))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name_or_path: str | os.PathLike,
    device: str | torch.device | None = "cpu",
    dtype: torch.dtype | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    attn_implementation: str | None = None,
    require_backpack: bool = False,
):
    """A model and its tokenizer, by Hub id (``"stanfordnlp/backpack-gpt2"``) or local folder.

    Backpacks load with the installed ``BackpackGPT2LMHeadModel`` (never the checkpoint's own code files), other
    configurations with ``AutoModelForCausalLM`` and ``trust_remote_code=False``. Works offline from the Hub cache
    (``HF_HUB_OFFLINE=1``, ``HF_HUB_CACHE``).

    Args:
        name_or_path: A local folder (config.json + weights) or a Hub model id.
        device: Where to put the model; None leaves it on the CPU where it was loaded.
        dtype: Parameter dtype (default: float32, whatever the checkpoint stores).
        revision: Hub branch, tag, commit or ``"refs/pr/N"``.
        token: Hugging Face token for private or gated repos (default: the logged-in one).
        cache_dir: Hub cache folder (default: HF_HUB_CACHE).
        attn_implementation: ``"sdpa"``, ``"eager"``, ``"flash_attention_2"``...
        require_backpack: Refuse a configuration that is not a Backpack.

    Returns:
        ``(model, tokenizer)``: the model in eval mode; the repo's tokenizer, else GPT-2's, with a pad token.

    Raises:
        ModelLoadError (a ValueError): a path that does not exist, a Hub id that is not cached while offline,
            a folder without config.json or weights, weights that are missing or do not fit the configuration.
    """
    name = os.fspath(name_or_path)
    config = read_config(name, revision=revision, token=token, cache_dir=cache_dir)
    model = load_pretrained_model(name, dtype=dtype, revision=revision, token=token, cache_dir=cache_dir,
                                  attn_implementation=attn_implementation, config=config,
                                  require_backpack=require_backpack)
    if device is not None:
        model = model.to(device)
    tokenizer = load_tokenizer(name, model_max_length=getattr(model.config, "n_positions", None),
                               revision=revision, token=token, cache_dir=cache_dir, config=model.config)
    return model, tokenizer
