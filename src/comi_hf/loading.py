"""What the command-line tools and scripts share: parsing arguments, reading text files, checking a
device, loading a model.

Each turns the ways these go wrong (a missing or binary file, a closed stdin, a device this
machine lacks, a directory that is not COMI, a truncated weights file, a Hub that cannot be
reached) into one [`UsageError`] whose message names the problem, for a one-line report.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .errors_comi import ModelLoadError, UsageError

if TYPE_CHECKING:
    from transformers import HfArgumentParser

__all__ = ["check_device", "check_model_source", "first_line", "load_comi", "parse_script_arguments", "read_text"]

# A Hub repository id: `name` or `namespace/name` (huggingface_hub's rule, without its length checks).
_REPO_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def parse_script_arguments(parser: HfArgumentParser, argv: list[str] | None = None) -> tuple:
    """`parser.parse_args_into_dataclasses(argv)`, one instance per dataclass (then a namespace of
    any arguments added to the parser by hand); an option no dataclass takes is reported as
    argparse reports one (`error: unrecognized arguments: ...`, exit status 2), not as a traceback.
    DeepSpeed's notice that it found no GPU is kept off stdout."""
    from comi_hf_cli import quiet_deepspeed

    # The scripts print results on stdout, where DeepSpeed's no-GPU notice would land among them.
    quiet_deepspeed()
    *parsed, unknown = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return tuple(parsed)


def first_line(error: BaseException, limit: int = 400) -> str:
    """An error's message as one line: its lines joined, at most `limit` characters (torch's and the
    Hub's messages can run to pages)."""
    text = " ".join(line.strip() for line in str(error).strip().splitlines() if line.strip())
    if not text:
        return type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_text(path: str, what: str) -> str:
    """A UTF-8 text file (a byte-order mark is dropped), or stdin for `-`."""
    try:
        if path == "-":
            if sys.stdin is None:
                raise UsageError(f"stdin is closed: there is no {what} to read")
            data = sys.stdin.buffer.read()
            path = "stdin"
        else:
            if Path(path).is_dir():
                raise UsageError(f"the {what} {path} is a directory, not a file")
            if not Path(path).exists():
                raise UsageError(f"no such {what}: {path}")
            data = Path(path).read_bytes()
    except OSError as error:
        raise UsageError(f"cannot read the {what} {path}: {error.strerror or error}") from error
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise UsageError(f"the {what} {path} is not UTF-8 text (byte {error.start} cannot be decoded)") from error


def check_device(name: str) -> torch.device:
    """The device called `name`, if this machine has it and it can hold a model's weights."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as error:
        raise UsageError(f"unknown device {name!r}") from error
    if device.type == "meta":
        raise UsageError("device 'meta' holds no data: give a device that computes (cpu, cuda, ...)")
    try:
        torch.empty(0, device=device)
    except (AssertionError, RuntimeError, NotImplementedError) as error:  # torch asserts when built without CUDA
        reason = first_line(error).split(". ")[0][:160]
        raise UsageError(f"device {name!r} is not available here ({reason})") from error
    return device


def check_model_source(name: str | os.PathLike, what: str = "model") -> str:
    """`name` as a model source: an existing directory holding a config.json, or a Hub id.

    A name that can only be a path (absolute, `./`, `~`, or more than one `/`) and is not a
    directory is "no such directory" (not the Hub's rules for repository names); a directory
    without config.json is not a model.
    """
    name = str(name)
    if not name.strip():
        raise UsageError(f"the {what} name is empty")
    path = Path(name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{name} has no config.json: it is not a {what} directory")
        return name
    if path.exists():
        raise UsageError(f"the {what} {name} is a file; give its directory")
    if not _REPO_ID.match(name) or name.startswith((".", "~")):
        raise UsageError(f"no such {what} directory: {name}")
    return name


def load_comi(name_or_path: str | os.PathLike, *, dtype: torch.dtype | str = "auto", model_class=None, **kwargs):
    """A COMI model and its tokenizer from a directory or a Hub id.

    `model_class` is `COMIForConditionalGeneration` by default (`COMIPromptEncoder` for a server
    whose decoder runs elsewhere). Weights are read from safetensors only (pickled files can run
    code). A Hub id is first looked up in the local cache when the Hub cannot be reached, instead
    of retrying for a minute. Raises a [`UsageError`] for a source that does not exist and a
    [`ModelLoadError`] for one that is not a loadable COMI model with its tokenizer, in one line.
    """
    from transformers import AutoTokenizer, PreTrainedConfig
    from transformers.utils import logging as hf_logging

    from .configuration_comi import COMIConfig

    if model_class is None:
        from .modeling_comi import COMIForConditionalGeneration as model_class

    name = check_model_source(name_or_path)
    hub_options = {}
    if not Path(name).is_dir():
        if _offline() or not _hub_reachable():
            hub_options["local_files_only"] = True
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)  # its retry warnings are not ours to print
    try:
        try:
            config, _ = PreTrainedConfig.get_config_dict(name, **hub_options)
        except Exception as error:
            if hub_options.get("local_files_only"):
                raise UsageError(
                    f"{name} is not a local directory, and is not in the local Hub cache "
                    f"({'HF_HUB_OFFLINE is set' if _offline() else 'the Hub cannot be reached'})"
                ) from error
            raise ModelLoadError(f"cannot load a COMI model from {name}: {first_line(error)}") from error
        if not isinstance(config, dict):
            raise ModelLoadError(f"{name}'s config.json holds a JSON {type(config).__name__}, not an object")
        model_type = config.get("model_type")
        if model_type != COMIConfig.model_type:
            raise ModelLoadError(
                f"{name} is {'a ' + model_type if model_type else 'not a'} model, not a COMI model "
                "(build one from a backbone with COMIForConditionalGeneration.from_backbone)"
            )
        # A small model loads in a moment; transformers' per-weight bar is noise on a command line.
        hf_logging.disable_progress_bar()
        try:
            model = model_class.from_pretrained(name, dtype=dtype, use_safetensors=True, **hub_options, **kwargs)
        except ModelLoadError:
            raise
        except Exception as error:  # whatever the files are (truncated, pickled, mismatched): one line
            raise ModelLoadError(f"cannot load a COMI model from {name}: {first_line(error)}") from error
        finally:
            hf_logging.enable_progress_bar()
        try:
            tokenizer = AutoTokenizer.from_pretrained(name, **hub_options)
        except Exception as error:
            raise ModelLoadError(
                f"cannot load the tokenizer of {name} ({first_line(error)[:120]}): a COMI directory holds its "
                "tokenizer's files (tokenizer.json, tokenizer_config.json) beside the weights"
            ) from error
    finally:
        hub_logger.setLevel(level)
    return model, tokenizer


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _hub_reachable(timeout: float = 5.0) -> bool:
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception:
        return False
    return True
