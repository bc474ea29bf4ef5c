"""The error catalogue of issue 26: hundreds of bad inputs and faults, and how comi_hf answers each.

    python research/error_catalogue.py --output DIR [--quick] [--no-server]

Every case sends one thing to one surface of comi_hf and says what should come back:

* `cli`: a console script (`comi-qa`, `comi-convert`, `comi-synth`, `comi-export-decoder`,
  `comi-serve`'s startup). Most run in this process through `comi_hf_cli.run_command` (what the
  console script runs), with file descriptors 1 and 2 captured; those that need a process of their
  own (closed stdin or stdout, a full disk, a broken pipe, bytes in argv, `--help`) run the installed
  console script in a subprocess. `comi-serve` cases in this process stop where uvicorn would
  start serving: getting that far is its "answer".
* `python`: `COMIForConditionalGeneration.generate` / `compress` / `from_pretrained`,
  `pipeline("comi-qa")`, `COMIServingClient`.
* `http`: `/v1/answer`, OpenAI's `/v1/chat/completions`, `/v1/completions` and `/v1/models`,
  `/health`, `/metrics` of a real `comi-serve` whose decoder is a real vLLM server (limits: 400
  context tokens, 256 KiB bodies, 4 questions, 3 sequences, 64 new tokens), and of one whose vLLM
  is down; and `COMIServingClient` against that vLLM (all skipped with `--no-server`).

Each outcome is classified as one of:

* `clear`: an error was expected and one clear error came: exit status 2 with exactly one
  `PROG: error: ...` line on stderr, last, and nothing else there but `PROG: warning:` lines,
  progress bars and argparse's usage; a `comi_hf.COMIError` whose message is one line; an HTTP
  error with a JSON body `{"error": {"message", ...}}`; of the expected class, status, field and
  message (when the case names them);
* `answered`: an answer was expected, and a right one came (the case's check, when it has one);
* `wrong_error`: an error was expected and a clean error came, but not the one expected (another
  status, class or field, a message that is several lines or does not say what the case expects,
  other lines on stderr, an HTTP body of another shape);
* `refused`: an answer was expected and a clean error came instead;
* `silent_wrong`: an error was expected and an answer came (exit 0, HTTP 200, a return value), or
  an answer was expected and a wrong one came;
* `traceback`: a Python traceback, an exception outside the `COMIError` family, an HTTP 5xx whose
  body is not the error JSON, a process killed by a signal;
* `hang`: no answer within the case's time limit.

Writes `catalogue.json` (every case: id, surface, what it sends, what it expects, the outcome, the
exit or HTTP status, the error class and field, the first line of the message) and `catalogue.md`
(the command, the counts per surface and outcome, and every case that is neither `clear` nor
`answered`), and prints the same table.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here reaches the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import HfArgumentParser  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
if str(SRC) not in sys.path:  # the checkout's comi_hf, whichever is installed
    sys.path.insert(0, str(SRC))
sys.path.insert(0, str(REPO / "bench"))  # server_processes: servers that die with this process

import comi_hf  # noqa: E402
import comi_hf_cli  # noqa: E402
from comi_hf import COMIError  # noqa: E402
from comi_hf.loading import parse_script_arguments  # noqa: E402

OUTCOMES = ("clear", "answered", "wrong_error", "refused", "silent_wrong", "traceback", "hang")
SURFACES = ("cli", "python", "http")
DOCUMENT = REPO / "examples" / "data" / "example_document.txt"
# The shipped default model answers questions about comi-synth documents such as the example one.
QUESTION = "what is the code of long hill ?"
RIGHT = "9 9 3 7"
# The tiny served model's world (tests/test_serving_vllm.py).
WORDS = "the code of red river is 4 8 2 1 . the code of blue lake is 1 2 3 4 . old mill is north .".split()
SERVED_CONTEXT = " ".join(WORDS * 2)
SERVED_QUESTION = "what is the code of red river ?"
API_KEY = "secret"
NO_CUDA = not torch.cuda.is_available()


@dataclass
class CatalogueArguments:
    output: str = field(metadata={"help": "Where catalogue.json and catalogue.md go."})
    quick: bool = field(default=False, metadata={"help": "A small subset of the cases (a smoke test)."})
    no_server: bool = field(default=False, metadata={"help": "Skip the cases that need vLLM and comi-serve."})
    only: str | None = field(default=None, metadata={"help": "Run only the cases whose id contains this."})
    case_timeout: float = field(default=120.0, metadata={"help": "Seconds a case may take before it is a hang."})


# --------------------------------------------------------------------------- cases
@dataclass
class Expect:
    """What a case should get: an error (of this status, class, field, with this in its message)
    or an answer; `check(raw)` returns a problem with what came, or `None`."""

    kind: str
    status: int | tuple[int, ...] | None = None
    error: str | None = None
    field: str | None = None
    message: str | None = None
    check: Callable | None = None

    def describe(self) -> dict:
        described = {"kind": self.kind}
        for name in ("status", "error", "field", "message"):
            if getattr(self, name) is not None:
                described[name] = getattr(self, name)
        if self.check is not None:
            described["check"] = (self.check.__doc__ or self.check.__name__).strip()
        return described


def err(first=None, *, status=None, error=None, field=None, message=None, check=None) -> Expect:
    """An expected error; `first` is the status (an int or a tuple of them) or the error class's name."""
    if isinstance(first, str):
        error = first
    elif first is not None:
        status = first
    return Expect("error", status, error, field, message, check)


def ans(check=None, status=None) -> Expect:
    """An expected answer (HTTP: of `status`, 200 by default)."""
    return Expect("answer", status=status, check=check)


@dataclass
class Raw:
    """What came back: an exit or HTTP status with stdout/stderr or a body, or a Python value or exception."""

    code: int | None = None
    stdout: str = ""
    stderr: str = ""
    value: object = None
    exception: BaseException | None = None
    content_type: str = ""
    seconds: float = 0.0
    timed_out: bool = False
    note: str = ""
    trace: str = ""


@dataclass
class Case:
    id: str
    surface: str
    sends: str
    expect: Expect
    run: Callable[[], Raw]
    quick: bool = False
    server: bool = False
    prog: str | None = None


class CaseTimeout(BaseException):
    """Raised by the alarm when a case runs past its time limit (a BaseException: nothing catches it)."""


class WouldServe(BaseException):
    """comi-serve got as far as starting uvicorn: it would serve."""


@contextlib.contextmanager
def time_limit(seconds: float):
    def alarm(*_):
        raise CaseTimeout()

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def captured_fds():
    """File descriptors 1 and 2 (and so sys.stdout, sys.stderr and every logging handler) into
    files; yields a dict that holds their text once the block ends."""
    texts = {}
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    files = {fd: tempfile.TemporaryFile(mode="w+b") for fd in (1, 2)}
    for fd, handle in files.items():
        os.dup2(handle.fileno(), fd)
    try:
        yield texts
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        for fd in (1, 2):
            os.dup2(saved[fd], fd)
            os.close(saved[fd])
            files[fd].seek(0)
            texts[fd] = files[fd].read().decode("utf-8", "replace")
            files[fd].close()


# --------------------------------------------------------------------------- runners
def run_in_process(prog: str, argv: list[str], stdin: bytes | None, timeout: float) -> Raw:
    """`run_command(prog, argv)` as the console script runs it, with fds 1 and 2 captured."""
    raw = Raw()
    saved_stdin, saved_showwarning = sys.stdin, warnings.showwarning
    if stdin is not None:
        sys.stdin = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8")
    started = time.monotonic()
    trace = ""
    try:
        with captured_fds() as texts:
            try:
                with time_limit(timeout):
                    raw.code = comi_hf_cli.run_command(prog, argv)
            except SystemExit as done:  # argparse
                raw.code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
            except WouldServe:
                raw.code, raw.note = 0, "would serve (uvicorn started)"
            except CaseTimeout:
                raw.timed_out = True
            except BaseException:  # noqa: BLE001 (what the console script would print as a traceback)
                raw.code = 1
                trace = traceback.format_exc()
    finally:
        sys.stdin, warnings.showwarning = saved_stdin, saved_showwarning
    raw.seconds = time.monotonic() - started
    raw.stdout, raw.stderr = texts[1], texts[2] + trace
    return raw


def subprocess_env() -> dict:
    path = os.pathsep.join(filter(None, [str(SRC), str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def console_script(prog: str) -> list[str]:
    found = shutil.which(prog)
    if found:
        return [found]
    function = prog.replace("-", "_")
    return [sys.executable, "-c", f"import sys, comi_hf_cli; sys.exit(comi_hf_cli.{function}())"]


def run_subprocess(prog: str, argv: list, timeout: float, stdin: bytes | None = None, mode: str = "") -> Raw:
    """The installed console script in its own process. `mode`: `close-stdin`, `close-stdout`,
    `full-stdout` (stdout is /dev/full), `broken-pipe` (stdout a pipe nobody reads)."""
    command = console_script(prog) + list(argv)
    options = dict(env=subprocess_env(), cwd=tempfile.gettempdir())
    stdout = subprocess.PIPE
    keep = []
    if mode == "close-stdin":
        options["preexec_fn"] = lambda: os.close(0)
    elif mode == "close-stdout":
        options["preexec_fn"] = lambda: os.close(1)
        stdout = None
    elif mode == "full-stdout":
        stdout = open("/dev/full", "wb")  # noqa: SIM115
        keep.append(stdout)
    elif mode == "broken-pipe":
        read, write = os.pipe()
        os.close(read)
        stdout = write
        keep.append(write)
    raw = Raw()
    started = time.monotonic()
    try:
        done = subprocess.run(
            command,
            input=stdin,
            stdin=None if stdin is not None or mode == "close-stdin" else subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.PIPE,
            timeout=timeout,
            **options,
        )
        raw.code = done.returncode
        raw.stdout = (done.stdout or b"").decode("utf-8", "replace") if stdout is subprocess.PIPE else ""
        raw.stderr = done.stderr.decode("utf-8", "replace")
    except subprocess.TimeoutExpired:
        raw.timed_out = True
    finally:
        for thing in keep:
            if isinstance(thing, int):
                os.close(thing)
            else:
                thing.close()
    raw.seconds = time.monotonic() - started
    return raw


def run_python(function: Callable[[], object], timeout: float) -> Raw:
    raw = Raw()
    started = time.monotonic()
    with captured_fds() as texts:
        try:
            with time_limit(timeout):
                raw.value = function()
        except CaseTimeout:
            raw.timed_out = True
        except BaseException as error:  # noqa: BLE001
            raw.exception = error
            raw.trace = f"{type(error).__module__}.{type(error).__qualname__}".removeprefix("builtins.")
    raw.seconds = time.monotonic() - started
    raw.stderr = texts[2]
    return raw


# The address space of a case run in a process of its own (`run_isolated`).
ISOLATED_BYTES = 8 << 30


def run_isolated(target: Callable, args: tuple, timeout: float) -> Raw:
    """`target(*args)` in a new process whose address space is capped at `ISOLATED_BYTES`: for a
    call that may try to allocate more memory than the machine has (uncapped, the kernel would kill
    this process, and the machine is shared). `target` must be a module-level function."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_isolated_call, args=(target, args, queue))
    raw = Raw()
    started = time.monotonic()
    with captured_fds():
        process.start()
        process.join(timeout)
        if process.is_alive():
            process.kill()
            process.join()
            raw.timed_out = True
    raw.seconds = time.monotonic() - started
    if raw.timed_out:
        return raw
    try:
        kind, *what = queue.get(timeout=5)
    except Exception:  # noqa: BLE001 (nothing came back: the process died)
        raw.exception = RuntimeError(f"the process died (exit status {process.exitcode})")
        raw.trace = "process death"
        return raw
    if kind == "value":
        raw.value = what[0]
        return raw
    names, message, field_name = what
    family = getattr(comi_hf, names[0], None)
    if "COMIError" in names and isinstance(family, type) and issubclass(family, COMIError):
        raw.exception = family(message, field=field_name)
    else:
        raw.exception = type(names[0], (Exception,), {})(message)
    raw.trace = raw.note = f"{names[0]}, in a process capped at {ISOLATED_BYTES >> 30} GiB of address space"
    return raw


def _isolated_call(target: Callable, args: tuple, queue) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (ISOLATED_BYTES, ISOLATED_BYTES))
    try:
        queue.put(("value", _describe_answer(target(*args))))
    except BaseException as error:  # noqa: BLE001
        names = [cls.__name__ for cls in type(error).__mro__]
        queue.put(("error", names, str(error), getattr(error, "field", None)))


def _made(value):
    """A fixture's value: `value()` if it is a callable that makes it."""
    return value() if callable(value) else value


def from_pretrained(path: str):
    """`COMIForConditionalGeneration.from_pretrained(path)` (module-level: `run_isolated` runs it)."""
    return comi_hf.COMIForConditionalGeneration.from_pretrained(path)


def run_http(url: str, method: str, body: bytes | None, headers: dict, timeout: float) -> Raw:
    raw = Raw()
    request = urllib.request.Request(url, data=body, headers=headers, method=method)
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw.code, raw.stdout = response.status, response.read().decode("utf-8", "replace")
            raw.content_type = response.headers.get("content-type", "")
    except urllib.error.HTTPError as error:
        raw.code, raw.stdout = error.code, error.read().decode("utf-8", "replace")
        raw.content_type = error.headers.get("content-type", "")
    except TimeoutError:
        raw.timed_out = True
    except (urllib.error.URLError, ConnectionError, OSError) as error:
        raw.note = f"connection failed: {error}"
    raw.seconds = time.monotonic() - started
    with contextlib.suppress(ValueError):
        raw.value = json.loads(raw.stdout)
    return raw


# --------------------------------------------------------------------------- classification
@dataclass
class Outcome:
    outcome: str
    code: int | None = None
    error: str | None = None
    field: str | None = None
    message: str = ""
    note: str = ""


def first_line(text: str) -> str:
    lines = [line for line in str(text).splitlines() if line.strip()]
    return lines[0][:300] if lines else ""


def _status_ok(expected, got) -> bool:
    if expected is None:
        return True
    return got in expected if isinstance(expected, tuple) else got == expected


def _error_problems(expect: Expect, got_status, got_class_names, got_field, message: str) -> list[str]:
    problems = []
    if not _status_ok(expect.status, got_status):
        problems.append(f"status {got_status}, expected {expect.status}")
    if expect.error is not None and got_class_names is not None and expect.error not in got_class_names:
        problems.append(f"{got_class_names[0]}, expected {expect.error}")
    fields = expect.field if isinstance(expect.field, tuple) else (expect.field,)
    if expect.field is not None and got_field not in fields:
        problems.append(f"field {got_field!r}, expected {expect.field!r}")
    if expect.message is not None and expect.message.lower() not in message.lower():
        problems.append(f"the message does not say {expect.message!r}")
    return problems


def classify(case: Case, raw: Raw) -> Outcome:
    if raw.timed_out:
        return Outcome("hang", note=f"no answer within {raw.seconds:.0f} s")
    if case.surface == "cli":
        outcome = _classify_cli(case, raw)
    elif case.surface == "python":
        outcome = _classify_python(case, raw)
    else:
        outcome = _classify_http(case, raw)
    if outcome.outcome in ("clear", "answered") and case.expect.check is not None:
        problem = case.expect.check(raw)
        if problem:
            outcome.outcome = "wrong_error" if outcome.outcome == "clear" else "silent_wrong"
            outcome.note = problem
    if outcome.outcome == "traceback" and raw.trace and not outcome.note:
        outcome.note = raw.trace
    if raw.note and not outcome.note:
        outcome.note = raw.note
    return outcome


def _classify_cli(case: Case, raw: Raw) -> Outcome:
    prog = case.prog
    stderr = raw.stderr
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(f"{prog}: error: ")]
    message = errors[-1][len(f"{prog}: error: ") :] if errors else first_line(stderr)
    if "Traceback (most recent call last)" in stderr or raw.code is None or raw.code < 0 or raw.code not in (0, 2):
        last = next((line for line in reversed(lines) if line.strip()), "")
        return Outcome("traceback", raw.code, message=last[:300], note="a traceback on stderr" if lines else "")
    if case.expect.kind == "answer":
        if raw.code == 0:
            return Outcome("answered", 0, message=first_line(raw.stdout))
        return Outcome("refused", raw.code, message=message)
    if raw.code == 0:
        return Outcome("silent_wrong", 0, message=first_line(raw.stdout), note="exit status 0")
    problems = _error_problems(case.expect, raw.code, None, None, message)
    if len(errors) != 1:
        problems.append(f"{len(errors)} `{prog}: error:` lines on stderr")
    elif lines[-1] != errors[0]:
        problems.append("the error line is not the last line of stderr")
    # Besides the error line: `PROG: warning:` lines, progress bars, and argparse's usage.
    usage = any(line.startswith("usage:") for line in lines)
    other = [
        line
        for line in lines
        if not line.startswith((f"{prog}: error: ", f"{prog}: warning: "))
        and not ("%|" in line or "it/s]" in line or "s/it]" in line)
        and not (usage and line.startswith(("usage:", " ")))
    ]
    if other:
        problems.append(f"{len(other)} other line(s) on stderr, the first {other[0][:100]!r}")
    if problems:
        return Outcome("wrong_error", raw.code, message=message, note="; ".join(problems))
    return Outcome("clear", raw.code, message=message)


def _classify_python(case: Case, raw: Raw) -> Outcome:
    error = raw.exception
    if error is None:
        if case.expect.kind == "answer":
            return Outcome("answered", message=_describe_answer(raw.value))
        return Outcome("silent_wrong", message=_describe_answer(raw.value), note="returned instead of raising")
    names = [cls.__name__ for cls in type(error).__mro__]
    text = str(error)
    if not isinstance(error, COMIError):
        return Outcome("traceback", error=type(error).__name__, message=first_line(text) or type(error).__name__)
    status, field_name = getattr(error, "status", None), getattr(error, "field", None)
    if case.expect.kind == "answer":
        return Outcome("refused", status, names[0], field_name, first_line(text))
    problems = _error_problems(case.expect, status, names, field_name, text)
    if len(text.strip().splitlines()) != 1:
        problems.append(f"the message has {len(text.strip().splitlines())} lines")
    outcome = "wrong_error" if problems else "clear"
    return Outcome(outcome, status, names[0], field_name, first_line(text), "; ".join(problems))


def _describe_answer(value: object) -> str:
    if isinstance(value, torch.Tensor):
        if value.is_floating_point():
            broken = int((~torch.isfinite(value)).sum())
            return f"a {value.dtype} tensor {tuple(value.shape)}" + (f" holding {broken} NaN or inf" if broken else "")
        return f"tensor {tuple(value.shape)}: {value.tolist()[:2]}"[:200]
    if isinstance(value, tuple) and value and all(isinstance(item, torch.Tensor) for item in value):
        return "(" + ", ".join(_describe_answer(item) for item in value) + ")"
    if isinstance(value, dict):
        shown = {key: value[key] for key in ("answer", "answers") if key in value}
        return json.dumps(shown or {key: str(item)[:40] for key, item in value.items()})[:200]
    return repr(value)[:200]


def _classify_http(case: Case, raw: Raw) -> Outcome:
    if raw.code is None:
        return Outcome("traceback", note=raw.note or "no HTTP answer")
    body = raw.value
    error_body = isinstance(body, dict) and isinstance(body.get("error"), dict) and "message" in body["error"]
    message = str(body["error"]["message"]) if error_body else first_line(raw.stdout)
    field_name = body["error"].get("param") if error_body else None
    code_name = body["error"].get("code") if error_body else None
    if case.expect.kind == "answer" and raw.code == (case.expect.status or 200):
        return Outcome("answered", raw.code, message=_describe_answer(body))
    if raw.code >= 500 and not error_body:
        return Outcome(
            "traceback", raw.code, message=message, note=f"{raw.code} with a body that is not the error JSON"
        )
    if case.expect.kind == "answer":
        return Outcome("refused", raw.code, str(code_name) if code_name else None, field_name, message)
    if 200 <= raw.code < 300:
        return Outcome("silent_wrong", raw.code, message=_describe_answer(body), note=f"{raw.code} instead of an error")
    problems = _error_problems(case.expect, raw.code, None, field_name, message)
    if not error_body:
        problems.append('the body is not {"error": {"message", ...}}')
    elif len(message.strip().splitlines()) != 1:
        problems.append("the message is several lines")
    outcome = "wrong_error" if problems else "clear"
    return Outcome(outcome, raw.code, str(code_name) if code_name else None, field_name, message, "; ".join(problems))


# --------------------------------------------------------------------------- fixtures
VOCAB_SIZE, EOS_ID, PAD_ID = 320, 0, 1
_TINY_WORDS = (
    "the code of red river blue lake green hill stone bridge old mill is was what which "
    "answer question document fact number city north south east west 0 1 2 3 4 5 6 7 8 9 . ? ,"
).split()


def build_tokenizer():
    """A byte-level BPE on a small vocabulary, laid out like Qwen2's (as tests/conftest.py builds it)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    split = Regex(
        r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""  # noqa: E501
    )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(split, behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([" ".join(_TINY_WORDS[i:] + _TINY_WORDS[:i]) for i in range(len(_TINY_WORDS))] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")


def backbone_config(**overrides):
    from transformers import Qwen2Config

    settings = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=4096,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    settings.update(overrides)
    return Qwen2Config(**settings)


def tiny_comi(seed: int = 0, backbone: dict | None = None, **config):
    torch.manual_seed(seed)
    settings = dict(encoder_layers=2, merge_size=4, segment_size=64)
    settings.update(config)
    model = comi_hf.COMIForConditionalGeneration(
        comi_hf.COMIConfig(text_config=backbone_config(**(backbone or {})), **settings)
    )
    return model.eval()


def official_state_dict(model, lora_r: int = 4, lora_alpha: float = 8.0) -> dict:
    """What the official training code's `COMI.state_dict()` holds for `model`'s weights, with
    random LoRA on the decoder's attention projections (as tests/test_convert.py builds it)."""
    generator = torch.Generator().manual_seed(1)
    state = {}
    for key, value in model.encoder.state_dict().items():
        state[f"encoder.model.{key}"] = value.clone()
    state["encoder.lm_head.weight"] = torch.randn(VOCAB_SIZE, 32, generator=generator)
    for key, value in model.lsa.state_dict().items():
        state[f"memory_fusion_layer.model.{key}"] = value.clone()
    state["memory_fusion_layer.model.embed_tokens.weight"] = torch.randn(VOCAB_SIZE, 32, generator=generator)
    state["memory_fusion_layer.lm_head.weight"] = torch.randn(VOCAB_SIZE, 32, generator=generator)
    for key, value in model.decoder.state_dict().items():
        module, _, leaf = key.rpartition(".")
        if module.split(".")[-1] in ("q_proj", "k_proj", "v_proj", "o_proj"):
            state[f"decoder.base_model.model.{module}.base_layer.{leaf}"] = value.clone()
            if leaf == "weight":
                state[f"decoder.base_model.model.{module}.lora_A.default.weight"] = torch.randn(
                    lora_r, value.shape[1], generator=generator
                )
                state[f"decoder.base_model.model.{module}.lora_B.default.weight"] = torch.randn(
                    value.shape[0], lora_r, generator=generator
                )
        else:
            state[f"decoder.base_model.model.{key}"] = value.clone()
    state["semantic_alignment_layer.weight"] = torch.randn(32, 32, generator=generator)
    state["semantic_alignment_layer.bias"] = torch.randn(32, generator=generator)
    for name, value in (("alpha_select", 1.5), ("beta_select", 0.5), ("alpha_merge", 2.0), ("beta_merge", 1.0)):
        state[name] = torch.tensor(value)
    return state


class Fixtures:
    """Models, files and directories the cases use, made on first use under one temporary folder."""

    def __init__(self, root: Path):
        self.root = root
        self._made: dict[str, object] = {}

    def _once(self, name: str, make: Callable[[], object]):
        if name not in self._made:
            self._made[name] = make()
        return self._made[name]

    def path(self, name: str) -> Path:
        return self.root / name

    # ---- files
    def file(self, name: str, data: bytes | str) -> str:
        def make():
            path = self.root / "files" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
            return str(path)

        return self._once("file:" + name, make)

    def directory(self, name: str, files: dict | None = None) -> str:
        def make():
            path = self.root / "dirs" / name
            path.mkdir(parents=True, exist_ok=True)
            for child, text in (files or {}).items():
                (path / child).write_text(text)
            return str(path)

        return self._once("dir:" + name, make)

    @property
    def document(self) -> str:
        return DOCUMENT.read_text(encoding="utf-8")

    # ---- tokenizer and models
    @property
    def tokenizer(self):
        return self._once("tokenizer", build_tokenizer)

    @property
    def tiny(self):
        return self._once("tiny", tiny_comi)

    @property
    def tiny_dir(self) -> str:
        def make():
            path = self.root / "tiny"
            self.tiny.save_pretrained(path)
            self.tokenizer.save_pretrained(path)
            return str(path)

        return self._once("tiny_dir", make)

    @property
    def served_dir(self) -> str:
        """A tiny model whose decoder vLLM's CPU backend serves (head_dim 32), with its exported decoder."""

        def make():
            path = self.root / "served"
            model = tiny_comi(backbone={"hidden_size": 128, "intermediate_size": 256, "initializer_range": 0.2})
            model.save_pretrained(path / "comi")
            self.tokenizer.save_pretrained(path / "comi")
            with captured_fds():
                model.export_decoder(path / "decoder", self.tokenizer)
            return str(path / "comi")

        return self._once("served_dir", make)

    @property
    def default(self):
        """The shipped default model and its tokenizer."""
        from comi_hf.loading import load_comi

        return self._once("default", lambda: load_comi(comi_hf.DEFAULT_MODEL))

    @property
    def qa(self):
        """`pipeline("comi-qa")`: the shipped default model."""
        from transformers import pipeline

        return self._once("qa", lambda: pipeline("comi-qa"))

    def default_ids(self, text: str) -> list[int]:
        return self.default[1](text, add_special_tokens=False)["input_ids"]

    # ---- model directories, damaged on purpose
    def model_copy(self, name: str, change: Callable[[Path], None], source=None) -> str:
        def make():
            path = self.root / "models" / name
            shutil.copytree(source or comi_hf.DEFAULT_MODEL, path)
            change(path)
            return str(path)

        return self._once("model:" + name, make)

    def nan_model(self, name: str, tensor: str, value: float = math.nan, where: int = 0) -> str:
        from safetensors.torch import load_file, save_file

        def change(path: Path):
            weights = load_file(path / "model.safetensors")
            weights[tensor] = weights[tensor].clone()
            weights[tensor].view(-1)[where] = value
            save_file(weights, path / "model.safetensors", metadata={"format": "pt"})

        return self.model_copy(name, change)

    def tensors_model(self, name: str, change_weights: Callable[[dict], None]) -> str:
        from safetensors.torch import load_file, save_file

        def change(path: Path):
            weights = load_file(path / "model.safetensors")
            change_weights(weights)
            save_file(weights, path / "model.safetensors", metadata={"format": "pt"})

        return self.model_copy(name, change)

    def config_model(self, name: str, change_config: Callable[[dict], object]) -> str:
        def change(path: Path):
            config = json.loads((path / "config.json").read_text())
            changed = change_config(config)
            text = changed if isinstance(changed, str) else json.dumps(config)
            (path / "config.json").write_text(text)

        return self.model_copy(name, change)

    @property
    def plain_backbone_dir(self) -> str:
        """A plain Qwen2 causal LM (not COMI) with the tiny tokenizer: comi-convert's backbone."""

        def make():
            from transformers import AutoModelForCausalLM

            path = self.root / "backbone"
            torch.manual_seed(0)
            AutoModelForCausalLM.from_config(backbone_config()).save_pretrained(path)
            self.tokenizer.save_pretrained(path)
            return str(path)

        return self._once("backbone", make)

    @property
    def official_state(self) -> dict:
        def make():
            torch.manual_seed(3)
            reference = comi_hf.COMIForConditionalGeneration(
                comi_hf.COMIConfig(text_config=backbone_config(), encoder_layers=3, num_mem_fusion_layers=1)
            ).eval()
            return official_state_dict(reference)

        return self._once("official_state", make)

    def checkpoint(self, name: str, change: Callable[[dict], dict] | None = None, raw: bytes | None = None) -> str:
        from safetensors.torch import save_file

        def make():
            path = self.root / "checkpoints" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if raw is not None:
                path.write_bytes(raw)
            else:
                state = {key: value.clone() for key, value in self.official_state.items()}
                save_file(change(state) if change else state, path)
            return str(path)

        return self._once("checkpoint:" + name, make)

    def fresh(self, name: str) -> str:
        """A path that does not exist yet (a new one each call)."""
        count = self._made.get("fresh:" + name, 0) + 1
        self._made["fresh:" + name] = count
        path = self.root / "out" / f"{name}-{count}"
        path.parent.mkdir(parents=True, exist_ok=True)
        return str(path)


# --------------------------------------------------------------------------- the catalogue
class Catalogue:
    def __init__(self, fixtures: Fixtures, timeout: float):
        self.fx = fixtures
        self.timeout = timeout
        self.cases: list[Case] = []
        self.server: dict = {}

    def add(self, case: Case) -> None:
        assert all(case.id != other.id for other in self.cases), case.id
        self.cases.append(case)

    # ---- builders
    def cli(self, id, prog, argv, expect, sends=None, stdin=None, quick=False, mode=None, server=False):
        """A console-script case; `argv` may hold callables (fixtures made when the case runs)."""

        def run():
            with captured_fds():  # making a fixture can print (progress bars)
                args = [arg() if callable(arg) else arg for arg in argv]
                data = stdin() if callable(stdin) else stdin
            if mode is not None:
                return run_subprocess(prog, args, self.timeout, data, "" if mode == "subprocess" else mode)
            with serve_stops_at_uvicorn() if prog == "comi-serve" else contextlib.nullcontext():
                return run_in_process(prog, args, data, self.timeout)

        shown = sends or " ".join(_shown(arg) for arg in argv)
        if mode is not None:
            shown += f"  [subprocess{', ' + mode if mode != 'subprocess' else ''}]"
        self.add(Case(id, "cli", f"{prog} {shown}", expect, run, quick, server, prog))

    def py(self, id, sends, function, expect, quick=False, server=False):
        self.add(Case(id, "python", sends, expect, lambda: run_python(function, self.timeout), quick, server))

    def py_isolated(self, id, sends, target, args, expect):
        """A Python case in a process of its own, its memory capped (`run_isolated`); `args` may
        hold callables (fixtures made when the case runs)."""

        def run():
            with captured_fds():
                values = tuple(arg() if callable(arg) else arg for arg in args)
            return run_isolated(target, values, self.timeout)

        self.add(Case(id, "python", sends, expect, run))

    def http(self, id, sends, body=None, expect=None, raw=None, method="POST", path="/v1/answer", key=API_KEY,
             headers=None, server="main"):  # fmt: skip
        def run():
            base = self.server.get(server)
            if base is None:
                return Raw(note=f"comi-serve ({server}) is not running")
            data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
            sent = {"Content-Type": "application/json"} if data is not None else {}
            if key is not None:
                sent["Authorization"] = f"Bearer {key}"
            sent.update(headers or {})
            return run_http(base + path, method, data, sent, self.timeout)

        self.add(Case(id, "http", f"{method} {path} {sends}", expect, run, False, True))


def _shown(arg) -> str:
    """An argument as a shell would take it (a fixture as `<its name>`, bytes as Python writes them)."""
    if callable(arg):
        return f"<{_fixture_name(arg)}>"
    return shlex.quote(arg) if isinstance(arg, str) else repr(arg)


def _fixture_name(function) -> str:
    """What a fixture argument is, for a case's description: a function's name, or for a lambda
    the first string it holds (`lambda: fx.file("bom.txt", ...)`: bom.txt), else the last name it
    reads (`lambda: fx.tiny_dir`: tiny_dir)."""
    name = getattr(function, "__name__", "fixture")
    code = getattr(function, "__code__", None)
    if name != "<lambda>" or code is None:
        return name
    strings = [const for const in code.co_consts if isinstance(const, str) and const]
    return strings[0] if strings else (code.co_names[-1] if code.co_names else "fixture")


@contextlib.contextmanager
def serve_stops_at_uvicorn():
    """comi-serve in this process: where uvicorn would start serving, stop with `WouldServe`."""
    import uvicorn

    def stop(self, *args, **kwargs):
        raise WouldServe()

    saved = uvicorn.Server.run
    uvicorn.Server.run = stop
    try:
        yield
    finally:
        uvicorn.Server.run = saved


# ---- checks (a docstring says what each checks)
def stdout_answers(*answers: str):
    def check(raw: Raw):
        got = raw.stdout.strip().splitlines()
        if got != list(answers):
            return f"stdout {got[:4]!r}, expected {list(answers)!r}"
        return None

    check.__doc__ = f"stdout is {list(answers)!r}"
    return check


def stdout_lines(count: int):
    def check(raw: Raw):
        got = raw.stdout.splitlines()
        return None if len(got) == count else f"{len(got)} lines on stdout, expected {count}"

    check.__doc__ = f"{count} line(s) on stdout"
    return check


def json_answer_is(answer: str):
    def check(raw: Raw):
        try:
            got = json.loads(raw.stdout.splitlines()[0])["answer"]
        except (ValueError, KeyError, IndexError):
            return f"stdout is not a JSON line with an answer: {raw.stdout[:100]!r}"
        return None if got == answer else f"answer {got!r}, expected {answer!r}"

    check.__doc__ = f"a JSON line whose answer is {answer!r}"
    return check


def quickly(seconds: float, absent: str | None = None):
    def check(raw: Raw):
        if raw.seconds > seconds:
            return f"took {raw.seconds:.1f} s (more than {seconds} s)"
        if absent and absent in raw.stderr:
            return f"{absent!r} on stderr"
        return None

    check.__doc__ = f"within {seconds} s" + (f", without {absent!r} on stderr" if absent else "")
    return check


def not_missing(raw: Raw):
    """the message does not call an existing file missing"""
    return "the message calls an existing file missing" if "no such" in raw.stderr else None


def warned(text: str):
    def check(raw: Raw):
        return None if "warning: " in raw.stderr and text in raw.stderr else f"no warning saying {text!r}"

    check.__doc__ = f"a warning saying {text!r}"
    return check


def value_answer_is(answer: str):
    def check(raw: Raw):
        value = raw.value
        got = value.get("answer") if isinstance(value, dict) else None
        if got is None and isinstance(value, dict) and "answers" in value:
            got = value["answers"][0]
        return None if got == answer else f"answer {got!r}, expected {answer!r}"

    check.__doc__ = f"the answer is {answer!r}"
    return check


def value_answers_are(answers: list):
    def check(raw: Raw):
        value = raw.value
        got = value.get("answers") if isinstance(value, dict) else [item.get("answer") for item in value or []]
        return None if got == answers else f"answers {got!r}, expected {answers!r}"

    check.__doc__ = f"the answers are {answers!r}"
    return check


def is_tensor(raw: Raw):
    """a (queries, new tokens) tensor of token ids"""
    value = raw.value
    if not isinstance(value, torch.Tensor) or value.dim() != 2 or value.dtype != torch.long:
        return f"returned {_describe_answer(value)}"
    return None


def exists(path_of: Callable[[], str], *names: str):
    def check(raw: Raw):
        missing = [name for name in names if not (Path(path_of()) / name).exists()]
        return f"missing {missing}" if missing else None

    check.__doc__ = f"writes {', '.join(names)}"
    return check


# --------------------------------------------------------------------------- comi-qa
def qa_cases(cat: Catalogue) -> None:
    fx = cat.fx
    doc = str(DOCUMENT)
    text = DOCUMENT.read_text(encoding="utf-8")
    q = ["--question", QUESTION]
    e2 = err(status=2)
    right = stdout_answers(RIGHT)

    # ---- the context file
    cat.cli("qa.valid", "comi-qa", ["--context-file", doc, *q], ans(right), quick=True)
    cat.cli(
        "qa.valid.natural-phrasing",
        "comi-qa",
        ["--context-file", doc, "--question", "What is the code of long hill?"],
        ans(right),
    )
    cat.cli(
        "qa.valid.upper-case",
        "comi-qa",
        ["--context-file", doc, "--question", "WHAT IS THE CODE OF LONG HILL?"],
        ans(right),
    )
    cat.cli(
        "qa.valid.fullwidth-question-mark",
        "comi-qa",
        ["--context-file", doc, "--question", "what is the code of long hill？"],
        ans(right),
    )
    cat.cli(
        "qa.valid.tabs-and-spaces",
        "comi-qa",
        ["--context-file", doc, "--question", "  what\tis the  code of long hill ?  "],
        ans(right),
    )
    cat.cli("qa.valid.json", "comi-qa", ["--context-file", doc, *q, "--json"], ans(json_answer_is(RIGHT)))
    cat.cli(
        "qa.file.bom",
        "comi-qa",
        ["--context-file", lambda: fx.file("bom.txt", "\ufeff" + text), *q],
        ans(right),
        quick=True,
    )
    cat.cli(
        "qa.file.crlf",
        "comi-qa",
        ["--context-file", lambda: fx.file("crlf.txt", text.replace("\n", "\r\n")), *q],
        ans(right),
    )
    cat.cli(
        "qa.file.no-final-newline",
        "comi-qa",
        ["--context-file", lambda: fx.file("nonl.txt", text.rstrip("\n")), *q],
        ans(right),
    )
    cat.cli(
        "qa.file.missing",
        "comi-qa",
        ["--context-file", "/nonexistent/doc.txt", *q],
        err(2, message="no such context file"),
        quick=True,
    )
    cat.cli(
        "qa.file.relative-missing",
        "comi-qa",
        ["--context-file", "missing-doc.txt", *q],
        err(2, message="no such context file"),
    )
    cat.cli("qa.file.directory", "comi-qa", ["--context-file", "/tmp", *q], err(2, message="is a directory"))
    cat.cli(
        "qa.file.binary",
        "comi-qa",
        ["--context-file", lambda: fx.file("binary.bin", bytes(range(256))), *q],
        err(2, message="not UTF-8"),
        quick=True,
    )
    cat.cli(
        "qa.file.latin1",
        "comi-qa",
        ["--context-file", lambda: fx.file("latin1.txt", "café long hill".encode("latin-1")), *q],
        err(2, message="not UTF-8"),
    )
    cat.cli(
        "qa.file.utf16",
        "comi-qa",
        ["--context-file", lambda: fx.file("utf16.txt", text[:200].encode("utf-16")), *q],
        err(2, message="not UTF-8"),
    )
    cat.cli(
        "qa.file.encoded-surrogate",
        "comi-qa",
        ["--context-file", lambda: fx.file("surrogate.txt", b"long hill \xed\xa0\x80 code"), *q],
        err(2, message="not UTF-8"),
    )
    cat.cli(
        "qa.file.empty",
        "comi-qa",
        ["--context-file", lambda: fx.file("empty.txt", b""), *q],
        err(2, message="`context` is empty"),
        quick=True,
    )
    cat.cli(
        "qa.file.whitespace",
        "comi-qa",
        ["--context-file", lambda: fx.file("spaces.txt", " \n\t \r\n"), *q],
        err(2, message="`context` is empty"),
    )
    cat.cli(
        "qa.file.zero-width",
        "comi-qa",
        ["--context-file", lambda: fx.file("zw.txt", "\u200b\u200c\u200d\u2060\ufeff"), *q],
        err(2, message="`context` is empty"),
    )
    cat.cli(
        "qa.file.nul-bytes",
        "comi-qa",
        ["--context-file", lambda: fx.file("nul.txt", b"\x00\x00\x00"), *q],
        err(2, message="`context` is empty"),
    )
    cat.cli(
        "qa.file.bom-only",
        "comi-qa",
        ["--context-file", lambda: fx.file("bomonly.txt", "\ufeff"), *q],
        err(2, message="`context` is empty"),
    )
    cat.cli("qa.file.dev-null", "comi-qa", ["--context-file", "/dev/null", *q], err(2, check=not_missing))
    cat.cli(
        "qa.file.huge-by-token-count",
        "comi-qa",
        ["--context-file", lambda: fx.file("huge.txt", " ".join(text.split() * 160)), *q],
        err(2, message="more than its max_position_embeddings", check=quickly(60, absent="Encoding")),
        sends="--context-file <42,000 words> (the default decoder has 4096 positions) --question ...",
    )
    cat.cli(
        "qa.file.huge-for-merge-1",
        "comi-qa",
        ["--context-file", lambda: fx.file("long.txt", " ".join(text.split() * 20)), *q, "--merge-size", "1"],
        err(2, message="max_position_embeddings", check=quickly(60, absent="Encoding")),
        sends="--context-file <5,000 words> --merge-size 1 (5,000 memory vectors)",
    )
    cat.cli(
        "qa.file.huge-max-new-tokens",
        "comi-qa",
        ["--context-file", doc, *q, "--max-new-tokens", str(10**12)],
        err(2, message="max_position_embeddings"),
    )
    # ---- questions
    cat.cli(
        "qa.question.empty",
        "comi-qa",
        ["--context-file", doc, "--question", ""],
        err(2, message="`question` is empty"),
        quick=True,
    )
    cat.cli(
        "qa.question.spaces",
        "comi-qa",
        ["--context-file", doc, "--question", "   "],
        err(2, message="`question` is empty"),
    )
    cat.cli(
        "qa.question.zero-width",
        "comi-qa",
        ["--context-file", doc, "--question", "\u200b\u2060"],
        err(2, message="`question` is empty"),
    )
    cat.cli(
        "qa.question.argv-bytes",
        "comi-qa",
        ["--context-file", doc, "--question", "what \udcff ?"],
        err(2, message="not valid Unicode"),
        sends="--context-file doc --question $'what \\xff ?' (sys.argv holds U+DCFF)",
    )
    cat.cli(
        "qa.question.unknown-words",
        "comi-qa",
        ["--context-file", doc, "--question", "Where did the zebras go?"],
        ans(warned("are unknown to the tokenizer")),
    )
    cat.cli(
        "qa.question.and-questions-file",
        "comi-qa",
        ["--context-file", doc, *q, "--questions-file", doc],
        err(2, message="not allowed with"),
    )
    cat.cli("qa.question.none", "comi-qa", ["--context-file", doc], err(2, message="one of the arguments"))
    cat.cli("qa.context-file.none", "comi-qa", q, err(2, message="--context-file"))
    cat.cli(
        "qa.questions-file.valid",
        "comi-qa",
        [
            "--context-file",
            doc,
            "--questions-file",
            lambda: fx.file("questions.txt", f"{QUESTION}\n\nWhat is the code of long hill?\n"),
        ],
        ans(stdout_answers(RIGHT, RIGHT)),
    )
    cat.cli(
        "qa.questions-file.bom",
        "comi-qa",
        ["--context-file", doc, "--questions-file", lambda: fx.file("questions-bom.txt", f"\ufeff{QUESTION}\n")],
        ans(right),
    )
    cat.cli(
        "qa.questions-file.missing",
        "comi-qa",
        ["--context-file", doc, "--questions-file", "/nonexistent/q.txt"],
        err(2, message="no such questions file"),
    )
    cat.cli(
        "qa.questions-file.blank",
        "comi-qa",
        ["--context-file", doc, "--questions-file", lambda: fx.file("blank-q.txt", "\n  \n\t\n")],
        err(2, message="no questions"),
    )
    cat.cli(
        "qa.questions-file.zero-width-line",
        "comi-qa",
        ["--context-file", doc, "--questions-file", lambda: fx.file("zw-q.txt", f"{QUESTION}\n\u200b\n")],
        err(2, message="empty"),
    )
    cat.cli(
        "qa.questions-file.binary",
        "comi-qa",
        ["--context-file", doc, "--questions-file", lambda: fx.file("binary.bin", bytes(range(256)))],
        err(2, message="not UTF-8"),
    )
    cat.cli(
        "qa.questions-file.directory",
        "comi-qa",
        ["--context-file", doc, "--questions-file", "/tmp"],
        err(2, message="is a directory"),
    )
    cat.cli(
        "qa.questions-file.both-stdin",
        "comi-qa",
        ["--context-file", "-", "--questions-file", "-"],
        err(2),
        stdin=text.encode(),
    )
    # ---- options
    for value, expect in (
        ("0", err(2, message="--merge-size must be")),
        ("-1", err(2, message="--merge-size must be")),
        (str(10**30), err(2, message="--merge-size must be")),
        (str(2**31), err(2, message="--merge-size must be")),
        ("abc", err(2, message="invalid int value")),
        ("2.5", err(2, message="invalid int value")),
        ("", err(2, message="invalid int value")),
        ("1", ans(stdout_lines(1))),
        (str(2**31 - 1), ans(stdout_lines(1))),
    ):
        cat.cli(
            f"qa.merge-size.{value or 'empty'}",
            "comi-qa",
            ["--context-file", doc, *q, "--merge-size", value],
            expect,
            quick=value == "0",
        )
    for value, expect in (
        ("0", err(2, message="--max-new-tokens must be")),
        ("-5", err(2, message="--max-new-tokens must be")),
        ("abc", err(2, message="invalid int value")),
        ("1", ans(stdout_lines(1))),
    ):
        cat.cli(f"qa.max-new-tokens.{value}", "comi-qa", ["--context-file", doc, *q, "--max-new-tokens", value], expect)
    for value, expect in (
        ("0", err(2, message="--batch-size must be")),
        ("-1", err(2, message="--batch-size must be")),
        ("1000000000", ans(right)),
    ):
        cat.cli(f"qa.batch-size.{value}", "comi-qa", ["--context-file", doc, *q, "--batch-size", value], expect)
    cat.cli(
        "qa.dtype.float64",
        "comi-qa",
        ["--context-file", doc, *q, "--dtype", "float64"],
        err(2, message="invalid choice"),
    )
    cat.cli("qa.dtype.bfloat16", "comi-qa", ["--context-file", doc, *q, "--dtype", "bfloat16"], ans(stdout_lines(1)))
    cat.cli(
        "qa.unknown-option",
        "comi-qa",
        ["--context-file", doc, *q, "--temperature", "0.5"],
        err(2, message="unrecognized arguments"),
    )
    devices = [
        ("meta", err(2, message="holds no data")),
        ("mps", err(2, message="is not available here")),
        ("gpu7", err(2, message="unknown device")),
        ("CUDA", err(2, message="unknown device")),
        ("", err(2, message="unknown device")),
        ("cuda:-1", e2),
        ("cpu:0", ans(right)),
    ]
    if NO_CUDA:
        devices += [("cuda", err(2, message="is not available here")), ("cuda:1", err(2, message="not available"))]
    for value, expect in devices:
        cat.cli(
            f"qa.device.{value or 'empty'}",
            "comi-qa",
            ["--context-file", doc, *q, "--device", value],
            expect,
            quick=value == "meta",
        )
    cat.cli(
        "qa.explain.directory",
        "comi-qa",
        ["--context-file", doc, *q, "--explain", "/tmp"],
        err(2, message="cannot write"),
    )
    cat.cli(
        "qa.explain.no-parent",
        "comi-qa",
        ["--context-file", doc, *q, "--explain", "/nonexistent/dir/page.html"],
        err(2, message="cannot write"),
    )
    cat.cli(
        "qa.explain.valid",
        "comi-qa",
        ["--context-file", doc, *q, "--explain", lambda: fx.fresh("page") + ".html"],
        ans(right),
    )
    # ---- model directories
    for name, model, message in broken_models(fx):
        cat.cli(
            f"qa.model.{name}",
            "comi-qa",
            ["--model", model, "--context-file", doc, *q],
            err(2, message=message),
            quick=name in ("missing", "nan-decoder"),
        )
    cat.cli(
        "qa.model.other-tokenizer",
        "comi-qa",
        ["--model", lambda: other_tokenizer_model(fx), "--context-file", doc, *q],
        err(2, message="outside the model's vocabulary"),
    )
    cat.cli(
        "qa.model.qwen2-without-tokenizer",
        "comi-qa",
        ["--model", lambda: _without_tokenizer(fx, fx.tiny_dir, "tiny-no-tokenizer"), "--context-file", doc, *q],
        err(2, message="tokenizer"),
        sends="--model <a Qwen2-based COMI model without tokenizer files> --context-file doc --question ...",
    )
    # ---- in their own process
    cat.cli(
        "qa.process.valid",
        "comi-qa",
        ["--context-file", doc, "--question", "What is the code of long hill?"],
        ans(right),
        mode="subprocess",
    )
    cat.cli(
        "qa.process.stdin", "comi-qa", ["--context-file", "-", *q], ans(right), stdin=text.encode(), mode="subprocess"
    )
    cat.cli(
        "qa.process.stdin-empty",
        "comi-qa",
        ["--context-file", "-", *q],
        err(2, message="`context` is empty"),
        stdin=b"",
        mode="subprocess",
    )
    cat.cli(
        "qa.process.closed-stdin",
        "comi-qa",
        ["--context-file", "-", *q],
        err(2, message="stdin is closed"),
        mode="close-stdin",
    )
    cat.cli(
        "qa.process.closed-stdout",
        "comi-qa",
        ["--context-file", doc, *q],
        err(2, message="stdout is closed"),
        mode="close-stdout",
        quick=True,
    )
    cat.cli(
        "qa.process.full-stdout",
        "comi-qa",
        ["--context-file", doc, *q],
        err(2, message="No space left"),
        mode="full-stdout",
    )
    cat.cli(
        "qa.process.broken-pipe",
        "comi-qa",
        ["--context-file", doc, *q],
        err(2, message="cannot write"),
        mode="broken-pipe",
    )
    cat.cli(
        "qa.process.argv-bytes",
        "comi-qa",
        ["--context-file", doc, "--question", b"what \xff ?"],
        err(2, message="not valid Unicode"),
        mode="subprocess",
    )
    cat.cli(
        "qa.process.help",
        "comi-qa",
        ["--help"],
        ans(lambda raw: None if "usage:" in raw.stdout else "no usage"),
        mode="subprocess",
    )


def broken_models(fx: Fixtures) -> list[tuple[str, object, str]]:
    """(name, model directory or a callable making it, what the error says) for model loading."""

    def truncated(path: Path):
        data = (path / "model.safetensors").read_bytes()
        (path / "model.safetensors").write_bytes(data[: len(data) // 2])

    def emptied(path: Path):
        (path / "model.safetensors").write_bytes(b"")

    def no_weights(path: Path):
        (path / "model.safetensors").unlink()

    def pickled(path: Path):
        (path / "model.safetensors").unlink()
        (path / "pytorch_model.bin").write_bytes(b"a pickle is never read")

    def header_flipped(path: Path):
        data = bytearray((path / "model.safetensors").read_bytes())
        data[10:14] = b"\xff\xfe\x00\x01"
        (path / "model.safetensors").write_bytes(bytes(data))

    def last_nan(path: Path):
        data = bytearray((path / "model.safetensors").read_bytes())
        data[-4:] = b"\x00\x00\xc0\x7f"
        (path / "model.safetensors").write_bytes(bytes(data))

    def no_tokenizer(path: Path):
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (path / name).unlink()

    def tokenizer_garbage(path: Path):
        (path / "tokenizer.json").write_text("this is not a tokenizer")

    def generation_garbage(path: Path):
        (path / "generation_config.json").write_text("{not json")

    def generation_negative(path: Path):
        config = json.loads((path / "generation_config.json").read_text())
        config["max_new_tokens"] = -3
        (path / "generation_config.json").write_text(json.dumps(config))

    def drop_tensor(weights):
        del weights["decoder.model.layers.0.mlp.up_proj.weight"]

    def extra_tensor(weights):
        weights["mystery.weight"] = torch.zeros(3)

    def misshaped(weights):
        weights["encoder.norm.weight"] = torch.ones(65)

    def as_float16_nan(weights):
        weights["lsa.norm.weight"] = weights["lsa.norm.weight"].clone()
        weights["lsa.norm.weight"][0] = math.inf

    def set_key(key, value):
        def change(config):
            config[key] = value

        return change

    def set_text(key, value):
        def change(config):
            config["text_config"][key] = value

        return change

    def drop_text(config):
        del config["text_config"]

    tensor = "decoder.model.layers.0.mlp.up_proj.weight"
    return [
        ("missing", "/nonexistent/comi-model", "no such model directory"),
        ("relative-missing", "./nowhere-comi", "no such model directory"),
        ("a-file", lambda: str(Path(comi_hf.DEFAULT_MODEL) / "config.json"), "is a file"),
        ("empty-string", "", "model"),
        ("hub-id-not-cached", "someone/not-cached", "not in the local Hub cache"),
        ("empty-dir", lambda: fx.directory("empty-model"), "has no config.json"),
        ("no-config", lambda: fx.model_copy("no-config", lambda p: (p / "config.json").unlink()), "has no config.json"),
        ("other-model-type", lambda: comi_hf.DEFAULT_BACKBONE, "not a COMI model"),
        ("config-not-json", lambda: fx.config_model("config-not-json", lambda c: "{not json"), "config"),
        ("config-empty-object", lambda: fx.config_model("config-empty", lambda c: "{}"), "not a COMI model"),
        ("config-a-list", lambda: fx.config_model("config-list", lambda c: "[1, 2]"), "config"),
        (
            "config-merge-size-string",
            lambda: fx.config_model("config-merge-str", set_key("merge_size", "four")),
            "merge_size",
        ),
        ("config-merge-size-0", lambda: fx.config_model("config-merge-0", set_key("merge_size", 0)), "merge_size"),
        (
            "config-segment-size-negative",
            lambda: fx.config_model("config-seg-neg", set_key("segment_size", -5)),
            "segment_size",
        ),
        (
            "config-encoder-layers-too-many",
            lambda: fx.config_model("config-enc", set_key("encoder_layers", 99)),
            "encoder_layers",
        ),
        ("config-no-text-config", lambda: fx.config_model("config-no-text", drop_text), "cannot load"),
        ("config-vocab-string", lambda: fx.config_model("config-vocab", set_text("vocab_size", "sixty")), "vocab_size"),
        (
            "config-hidden-size-wrong",
            lambda: fx.config_model("config-hidden", set_text("hidden_size", 128)),
            "cannot load",
        ),
        ("weights-truncated", lambda: fx.model_copy("truncated", truncated), "cannot load"),
        ("weights-empty-file", lambda: fx.model_copy("emptied", emptied), "cannot load"),
        ("weights-missing", lambda: fx.model_copy("no-weights", no_weights), "cannot load"),
        ("weights-pickled", lambda: fx.model_copy("pickled", pickled), "model.safetensors"),
        ("weights-header-flipped", lambda: fx.model_copy("header-flipped", header_flipped), "cannot load"),
        ("weights-last-bytes-nan", lambda: fx.model_copy("flipped", last_nan), "NaN or infinite"),
        ("nan-decoder", lambda: fx.nan_model("nan-decoder", tensor), f"`{tensor}` hold 1 NaN"),
        (
            "inf-encoder",
            lambda: fx.nan_model("inf-encoder", "encoder.layers.1.self_attn.q_proj.weight", math.inf, 7),
            "NaN or infinite",
        ),
        ("nan-lsa", lambda: fx.nan_model("nan-lsa", "lsa.layers.0.mlp.down_proj.weight"), "NaN or infinite"),
        ("nan-alpha-merge", lambda: fx.nan_model("nan-alpha", "compressor.alpha_merge"), "NaN or infinite"),
        (
            "neginf-embeddings",
            lambda: fx.nan_model("neginf-embed", "decoder.model.embed_tokens.weight", -math.inf, 100),
            "NaN or infinite",
        ),
        (
            "nan-every-norm",
            lambda: fx.tensors_model(
                "nan-norms", lambda w: [w[k].fill_(math.nan) for k in w if k.endswith("norm.weight")]
            ),
            "NaN or infinite",
        ),
        ("inf-lsa-norm", lambda: fx.tensors_model("inf-lsa-norm", as_float16_nan), "NaN or infinite"),
        ("tensor-missing", lambda: fx.tensors_model("tensor-missing", drop_tensor), "missing"),
        ("tensor-extra", lambda: fx.tensors_model("tensor-extra", extra_tensor), "mystery.weight"),
        ("tensor-misshaped", lambda: fx.tensors_model("tensor-misshaped", misshaped), "encoder.norm.weight"),
        ("no-tokenizer", lambda: fx.model_copy("no-tokenizer", no_tokenizer), "cannot load the tokenizer"),
        ("tokenizer-garbage", lambda: fx.model_copy("tokenizer-garbage", tokenizer_garbage), "tokenizer"),
        ("generation-config-not-json", lambda: fx.model_copy("gen-garbage", generation_garbage), "generation"),
        ("generation-config-negative", lambda: fx.model_copy("gen-negative", generation_negative), "max_new_tokens"),
    ]


def other_tokenizer_model(fx: Fixtures) -> str:
    """The default model's weights beside another tokenizer (320 ids; the model has 64)."""
    return fx.model_copy("other-tokenizer", lambda path: _replace_tokenizer(fx, path))


def _replace_tokenizer(fx: Fixtures, path: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).unlink()
    fx.tokenizer.save_pretrained(path)


# --------------------------------------------------------------------------- comi-convert, comi-synth, export, serve
def convert_cases(cat: Catalogue) -> None:
    fx = cat.fx

    def base(checkpoint="good.safetensors", r="4", alpha="8", backbone=None, output=None, change=None):
        def made():
            return fx.checkpoint(checkpoint, change)

        made.__name__ = checkpoint  # how the case shows it
        return [
            made,
            "--backbone",
            backbone or (lambda: fx.plain_backbone_dir),
            "--output-dir",
            output or (lambda: fx.fresh("converted")),
            "--lora-r",
            r,
            "--lora-alpha",
            alpha,
        ]

    def with_value(name, value):
        def change(state):
            state[name] = torch.tensor(value)
            return state

        return change

    def inf_inside(state):
        key = next(key for key in state if key.startswith("encoder.model.layers.0."))
        state[key].view(-1)[3] = math.inf
        return state

    def extra_key(state):
        state["mystery.weight"] = torch.zeros(1)
        return state

    def wider(state):
        state["encoder.model.norm.weight"] = torch.ones(64)
        return state

    def no_lora(state):
        return {key: value for key, value in state.items() if "lora_" not in key}

    def only_lora(state):
        return {key: value for key, value in state.items() if "lora_" in key}

    cat.cli("convert.valid", "comi-convert", base(), ans(), quick=True)
    for alpha, message in (
        ("inf", "--lora-alpha must be"),
        ("1e308", "--lora-alpha must be"),
        ("2e39", "--lora-alpha must be"),
        ("nan", "--lora-alpha must be"),
        ("0", "--lora-alpha must be"),
        ("-8", "--lora-alpha must be"),
        ("abc", "invalid float value"),
        ("1e39", "the merged weights"),
    ):
        cat.cli(
            f"convert.alpha.{alpha}", "comi-convert", base(alpha=alpha), err(2, message=message), quick=alpha == "nan"
        )
    alpha_equals = [*base()[:-2], "--lora-alpha=-inf"]
    cat.cli("convert.alpha.-inf", "comi-convert", alpha_equals, err(2, message="--lora-alpha must be"))
    cat.cli("convert.alpha.-inf-as-option", "comi-convert", base(alpha="-inf"), err(2, message="--lora-alpha"))
    for r, message in (
        ("0", "--lora-r must be"),
        ("-4", "--lora-r must be"),
        ("2.5", "invalid int value"),
        ("8", "rank 4, but --lora-r is 8"),
        ("99999999999999999999", "rank 4"),
    ):
        cat.cli(f"convert.r.{r[:8]}", "comi-convert", base(r=r), err(2, message=message))
    cat.cli(
        "convert.merge-size.0", "comi-convert", [*base(), "--merge-size", "0"], err(2, message="--merge-size must be")
    )
    cat.cli(
        "convert.merge-size.huge",
        "comi-convert",
        [*base(), "--merge-size", str(10**30)],
        err(2, message="--merge-size must be"),
    )
    cat.cli(
        "convert.segment-size.0",
        "comi-convert",
        [*base(), "--segment-size", "0"],
        err(2, message="--segment-size must be"),
    )
    cat.cli(
        "convert.output.a-file",
        "comi-convert",
        base(output=lambda: fx.file("a-file", "")),
        err(2, message="is not a directory"),
    )
    cat.cli("convert.output.under-a-file", "comi-convert", base(output=lambda: fx.file("a-file", "") + "/sub"), err(2))
    cat.cli("convert.output.unwritable", "comi-convert", base(output="/proc/comi-out"), err(2))
    cat.cli(
        "convert.checkpoint.missing",
        "comi-convert",
        ["/nonexistent/model.safetensors", *base()[1:]],
        err(2, message="no such checkpoint"),
    )
    cat.cli(
        "convert.checkpoint.dir-without-weights",
        "comi-convert",
        [lambda: fx.directory("empty-ckpt"), *base()[1:]],
        err(2, message="no such checkpoint"),
    )
    truncated = [
        lambda: fx.checkpoint("truncated.safetensors", raw=_half(fx.checkpoint("good.safetensors"))),
        *base()[1:],
    ]
    cat.cli(
        "convert.checkpoint.truncated",
        "comi-convert",
        truncated,
        err(2, message="truncated, or not a safetensors file"),
    )
    cat.cli(
        "convert.checkpoint.empty",
        "comi-convert",
        [lambda: fx.checkpoint("empty.safetensors", raw=b""), *base()[1:]],
        err(2, message="not a safetensors file"),
    )
    cat.cli(
        "convert.checkpoint.text",
        "comi-convert",
        [lambda: fx.checkpoint("text.safetensors", raw=b"hello, I am not a checkpoint"), *base()[1:]],
        err(2, message="not a safetensors file"),
    )
    cat.cli(
        "convert.checkpoint.pickled",
        "comi-convert",
        [lambda: fx.checkpoint("pytorch_model.bin", raw=b"not read"), *base()[1:]],
        err(2, message="only safetensors"),
    )
    cat.cli(
        "convert.checkpoint.inf-in-tensor",
        "comi-convert",
        base("inf.safetensors", change=inf_inside),
        err(2, message="NaN or infinite"),
    )
    cat.cli(
        "convert.checkpoint.nan-scalar",
        "comi-convert",
        base("nan-alpha.safetensors", change=with_value("alpha_select", math.nan)),
        err(2, message="NaN or infinite"),
    )
    cat.cli(
        "convert.checkpoint.extra-key",
        "comi-convert",
        base("extra.safetensors", change=extra_key),
        err(2, message="mystery.weight"),
    )
    cat.cli(
        "convert.checkpoint.wrong-shape",
        "comi-convert",
        base("wider.safetensors", change=wider),
        err(2, message="wrong shapes"),
    )
    cat.cli("convert.checkpoint.no-lora", "comi-convert", base("no-lora.safetensors", change=no_lora), err(2))
    cat.cli("convert.checkpoint.only-lora", "comi-convert", base("only-lora.safetensors", change=only_lora), err(2))
    cat.cli(
        "convert.checkpoint.a-comi-model",
        "comi-convert",
        [str(Path(comi_hf.DEFAULT_MODEL) / "model.safetensors"), *base()[1:]],
        err(2),
    )
    cat.cli(
        "convert.backbone.nonexistent",
        "comi-convert",
        base(backbone="/nonexistent/backbone"),
        err(2, message="no such backbone directory"),
        quick=True,
    )
    cat.cli(
        "convert.backbone.wrong",
        "comi-convert",
        base(backbone=lambda: comi_hf.DEFAULT_BACKBONE),
        err(2, message="does not match"),
    )
    cat.cli(
        "convert.backbone.a-file",
        "comi-convert",
        base(backbone=lambda: fx.file("a-file", "")),
        err(2, message="is a file"),
    )
    cat.cli(
        "convert.backbone.no-config",
        "comi-convert",
        base(backbone=lambda: fx.directory("empty-backbone")),
        err(2, message="has no config.json"),
    )
    cat.cli(
        "convert.backbone.no-tokenizer",
        "comi-convert",
        base(backbone=lambda: _backbone_without_tokenizer(fx)),
        err(2, message="tokenizer"),
    )
    cat.cli("convert.backbone.hub-not-cached", "comi-convert", base(backbone="someone/not-cached"), err(2))


def _half(path: str) -> bytes:
    data = Path(path).read_bytes()
    return data[: len(data) // 2]


def _backbone_without_tokenizer(fx: Fixtures) -> str:
    return _without_tokenizer(fx, fx.plain_backbone_dir, "backbone-no-tokenizer")


def _without_tokenizer(fx: Fixtures, source: str, name: str) -> str:
    """A copy of the model directory `source` without its tokenizer files."""

    def make():
        path = fx.root / name
        shutil.copytree(source, path)
        for file in ("tokenizer.json", "tokenizer_config.json"):
            (path / file).unlink(missing_ok=True)
        return str(path)

    return fx._once(name, make)


def synth_cases(cat: Catalogue) -> None:
    fx = cat.fx

    def out():
        return fx.fresh("synth") + ".jsonl"

    def lines(count):
        def check(raw: Raw):
            return None if len(raw.stdout.splitlines()) == count else f"{len(raw.stdout.splitlines())} lines"

        check.__doc__ = f"{count} JSON line(s) on stdout"
        return check

    base = ["--split", "test", "--num-docs", "2"]
    cat.cli("synth.valid", "comi-synth", [*base, "--output", out], ans(), quick=True)
    cat.cli("synth.valid.stdout", "comi-synth", [*base, "--output", "-"], ans(lines(2)))
    cat.cli("synth.words.16", "comi-synth", [*base, "--words", "16", "--output", out], ans())
    for option, value, message in (
        ("--num-docs", "0", "--num-docs must be"),
        ("--num-docs", "-1", "--num-docs must be"),
        ("--num-docs", "abc", "invalid int value"),
        ("--words", "15", "--words must be"),
        ("--words", "0", "--words must be"),
        ("--words", "-5", "--words must be"),
        ("--words", "1000001", "--words must be"),
        ("--words", str(10**30), "--words must be"),
        ("--repeats", "0", "--repeats must be"),
        ("--repeats", "-2", "--repeats must be"),
    ):
        settings = {"--split": "test", "--num-docs": "2", "--output": out, option: value}
        argv = [item for pair in settings.items() for item in pair]
        cat.cli(f"synth.{option[2:]}.{value[:8]}", "comi-synth", argv, err(2, message=message), quick=value == "15")
    cat.cli(
        "synth.split.bogus",
        "comi-synth",
        ["--split", "dev", "--num-docs", "1", "--output", out],
        err(2, message="invalid choice"),
    )
    cat.cli("synth.output.missing", "comi-synth", ["--split", "test", "--num-docs", "1"], err(2, message="--output"))
    cat.cli(
        "synth.output.no-parent",
        "comi-synth",
        [*base, "--output", "/nonexistent/dir/out.jsonl"],
        err(2, message="cannot write"),
    )
    cat.cli("synth.output.directory", "comi-synth", [*base, "--output", "/tmp"], err(2, message="cannot write"))
    cat.cli("synth.output.dev-full", "comi-synth", [*base, "--output", "/dev/full"], err(2, message="No space left"))
    cat.cli("synth.output.proc", "comi-synth", [*base, "--output", "/proc/comi.jsonl"], err(2, message="cannot write"))
    cat.cli(
        "synth.process.closed-stdout",
        "comi-synth",
        [*base, "--output", "-"],
        err(2, message="stdout is closed"),
        mode="close-stdout",
    )
    cat.cli(
        "synth.process.full-stdout",
        "comi-synth",
        [*base, "--output", "-"],
        err(2, message="No space left"),
        mode="full-stdout",
    )
    cat.cli(
        "synth.process.broken-pipe",
        "comi-synth",
        [*base, "--output", "-"],
        err(2, message="cannot write"),
        mode="broken-pipe",
    )


def export_cases(cat: Catalogue) -> None:
    fx = cat.fx

    def out():
        return fx.fresh("decoder")

    cat.cli("export.valid", "comi-export-decoder", [lambda: fx.tiny_dir, out], ans())
    cat.cli("export.valid.default-model", "comi-export-decoder", [str(comi_hf.DEFAULT_MODEL), out], ans())
    cat.cli(
        "export.valid.empty-dir", "comi-export-decoder", [lambda: fx.tiny_dir, lambda: fx.directory("empty-out")], ans()
    )
    cat.cli(
        "export.output.a-file",
        "comi-export-decoder",
        [lambda: fx.tiny_dir, lambda: fx.file("a-file", "")],
        err(2, message="is not a directory"),
        quick=True,
    )
    cat.cli(
        "export.output.non-empty",
        "comi-export-decoder",
        [lambda: fx.tiny_dir, lambda: fx.directory("full-out", {"x.txt": "x"})],
        err(2, message="is not empty"),
    )
    cat.cli(
        "export.output.under-a-file",
        "comi-export-decoder",
        [lambda: fx.tiny_dir, lambda: fx.file("a-file", "") + "/sub"],
        err(2),
    )
    cat.cli("export.output.unwritable", "comi-export-decoder", [lambda: fx.tiny_dir, "/proc/comi-decoder"], err(2))
    cat.cli("export.output.missing", "comi-export-decoder", [lambda: fx.tiny_dir], err(2, message="output_dir"))
    for name, model, message in broken_models(fx):
        if name in (
            "missing",
            "other-model-type",
            "weights-truncated",
            "nan-decoder",
            "no-tokenizer",
            "no-config",
            "tensor-extra",
        ):
            cat.cli(f"export.model.{name}", "comi-export-decoder", [model, out], err(2, message=message))


def serve_cases(cat: Catalogue) -> None:
    fx = cat.fx
    dead = "http://127.0.0.1:9"

    def port_in_use():
        holder = socket.socket()
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        cat.fx._made.setdefault("held sockets", []).append(holder)  # kept open until the end
        return str(holder.getsockname()[1])

    def base(**changes):
        args = {"--model": lambda: fx.served_dir, "--vllm-url": dead, "--port": lambda: str(_free_port())}
        args.update(changes)
        argv = []
        for key, value in args.items():
            if value is not None:
                argv += [key, value]
        return argv

    cat.cli(
        "serve.valid.decoder-down",
        "comi-serve",
        base(),
        ans(lambda raw: None if "would serve" in raw.note else "did not start"),
    )
    for port, message in (
        ("0", "--port must be"),
        ("70000", "--port must be"),
        ("-1", "--port must be"),
        ("http", "invalid int value"),
    ):
        cat.cli(
            f"serve.port.{port}", "comi-serve", base(**{"--port": port}), err(2, message=message), quick=port == "70000"
        )
    cat.cli("serve.port.in-use", "comi-serve", base(**{"--port": port_in_use}), err(2, message="in use"))
    for host, message in (
        ("no.such.host.invalid", "cannot listen"),
        ("999.999.999.999", "cannot listen"),
        ("8.8.8.8", "cannot listen"),
    ):
        cat.cli(f"serve.host.{host or 'empty'}", "comi-serve", [*base(), "--host", host], err(2, message=message))
    for url, message in (
        ("ftp://127.0.0.1:8000", "not an http(s) URL"),
        ("127.0.0.1:8000", "not an http(s) URL"),
        ("http://", "not an http(s) URL"),
        ("http://127.0.0.1:99999", "--vllm-url"),
        ("http://[::1", "--vllm-url"),
        ("not a url", "not an http(s) URL"),
    ):
        cat.cli(f"serve.vllm-url.{url}", "comi-serve", base(**{"--vllm-url": url}), err(2, message=message))
    cat.cli("serve.vllm-url.missing", "comi-serve", base(**{"--vllm-url": None}), err(2, message="--vllm-url"))
    for name, model, message in broken_models(fx):
        if name in (
            "missing",
            "other-model-type",
            "weights-truncated",
            "nan-lsa",
            "no-tokenizer",
            "config-merge-size-string",
        ):
            cat.cli(f"serve.model.{name}", "comi-serve", base(**{"--model": model}), err(2, message=message))
    for option, value, message in (
        ("--cache-bytes", "-1", "--cache-bytes must be"),
        ("--max-context-tokens", "0", "--max-context-tokens must be"),
        ("--max-request-bytes", "0", "--max-request-bytes must be"),
        ("--max-questions", "0", "--max-questions must be"),
        ("--max-sequences", "-1", "--max-sequences must be"),
        ("--max-new-tokens", "0", "--max-new-tokens must be"),
        ("--device", "gpu7", "unknown device"),
        ("--device", "meta", "holds no data"),
        ("--log-level", "loud", "invalid choice"),
        ("--dtype", "int8", "invalid choice"),
    ):
        cat.cli(f"serve.{option[2:]}.{value}", "comi-serve", [*base(), option, value], err(2, message=message))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --------------------------------------------------------------------------- Python API
CTX = "the code of red river is 4 8 2 1 . the code of blue lake is 1 2 3 4 . old mill is north ."
QRY = "what is the code of red river ?"


def generate_cases(cat: Catalogue) -> None:
    fx = cat.fx

    def gen(**kwargs):
        options = {"context": CTX, "query": QRY, "tokenizer": fx.tokenizer, "max_new_tokens": 4}
        options.update(kwargs)
        options = {key: value for key, value in options.items() if value is not _DROP}
        return lambda: fx.tiny.generate(**options)

    def ids(text):
        return torch.tensor([fx.tokenizer(text, add_special_tokens=False)["input_ids"]])

    def gen_ids(*args, **kwargs):
        def call():
            values = [arg() if callable(arg) else arg for arg in args]
            return fx.tiny.generate(*values, max_new_tokens=4, **kwargs)

        return call

    def context_ids():
        return ids(CTX)

    def query_ids():
        return ids(QRY)

    bad = err(error="InvalidInputError", status=400)

    cat.py(
        "generate.valid.text", "tiny.generate(context=..., query=..., tokenizer=...)", gen(), ans(is_tensor), quick=True
    )
    cat.py(
        "generate.valid.ids",
        "tiny.generate(input_ids, None, query_ids, None)",
        gen_ids(context_ids, None, query_ids, None),
        ans(is_tensor),
    )
    cat.py(
        "generate.valid.int32-ids",
        "generate with int32 token-id tensors",
        gen_ids(lambda: context_ids().int(), None, lambda: query_ids().int(), None),
        ans(is_tensor),
    )
    cat.py(
        "generate.valid.bool-masks",
        "generate with bool attention masks",
        gen_ids(context_ids, lambda: torch.ones_like(context_ids(), dtype=torch.bool), query_ids, None),
        ans(is_tensor),
    )
    cat.py(
        "generate.valid.text-lists",
        "generate(context=[a, b], query=[q1, q2])",
        gen(context=[CTX, CTX[:40]], query=[QRY, "which city ?"]),
        ans(is_tensor),
    )
    cat.py("generate.valid.bom", "generate(context='\\ufeff' + text)", gen(context="\ufeff" + CTX), ans(is_tensor))
    for value, expect in (
        (None, ans(is_tensor)),
        (1, ans(is_tensor)),
        (2**31 - 1, ans(is_tensor)),
        (0, err("InvalidInputError", field="merge_size", message="`merge_size` must be an integer")),
        (-1, err("InvalidInputError", field="merge_size")),
        (10**30, err("InvalidInputError", field="merge_size")),
        (2**63, err("InvalidInputError", field="merge_size")),
        (2.5, err("InvalidInputError", field="merge_size")),
        (4.0, err("InvalidInputError", field="merge_size")),
        ("4", err("InvalidInputError", field="merge_size")),
        (True, err("InvalidInputError", field="merge_size")),
        (math.nan, err("InvalidInputError", field="merge_size")),
    ):
        expect.error, expect.status = ("InvalidInputError", 400) if expect.kind == "error" else (None, None)
        cat.py(
            f"generate.merge-size.{_short(value)}",
            f"generate(..., merge_size={value!r})",
            gen(merge_size=value),
            expect,
            quick=value == 0,
        )
    for name, label, value in (
        ("context", "int", 5),
        ("context", "list-with-int", ["a text", 5]),
        ("context", "empty-list", []),
        ("context", "empty", ""),
        ("context", "spaces", "   \n\t"),
        ("context", "zero-width", "\u200b\u200c\u2060"),
        ("context", "surrogate", "a \ud800 b"),
        ("context", "bytes", b"bytes are not text"),
        ("query", "int", 5),
        ("query", "empty", ""),
        ("query", "zero-width", "\u200b"),
        ("query", "surrogate", "what \udcff ?"),
        ("query", "list-with-none", [QRY, None]),
    ):
        field_name = name if not isinstance(value, list) or not value else None
        cat.py(
            f"generate.{name}.{label}",
            f"generate({name}={value!r:.40})",
            gen(**{name: value}),
            err(error="InvalidInputError", status=400, field=field_name),
        )
    cat.py(
        "generate.context.none-with-query",
        "generate(query=..., tokenizer=...) without a context",
        gen(context=_DROP),
        bad,
    )
    cat.py(
        "generate.tokenizer.missing",
        "generate(context=..., query=...) without tokenizer",
        gen(tokenizer=_DROP),
        err("InvalidInputError", field="tokenizer"),
    )
    cat.py(
        "generate.text-and-ids",
        "generate(input_ids, ..., context=...)",
        lambda: fx.tiny.generate(ids(CTX), None, ids(QRY), None, context=CTX, query=QRY, tokenizer=fx.tokenizer),
        bad,
    )
    cat.py("generate.nothing", "generate()", lambda: fx.tiny.generate(), bad)
    cat.py("generate.no-query", "generate(input_ids) without query_ids", gen_ids(context_ids), bad)
    for label, make, field_name in (
        ("bool-tensor", lambda: context_ids().bool(), "input_ids"),
        ("float-tensor", lambda: context_ids().float(), "input_ids"),
        ("1-d", lambda: context_ids()[0], "input_ids"),
        ("3-d", lambda: context_ids()[None], "input_ids"),
        ("list", lambda: context_ids()[0].tolist(), "input_ids"),
        ("empty-batch", lambda: torch.zeros(0, 5, dtype=torch.long), "input_ids"),
        ("zero-length", lambda: torch.zeros(1, 0, dtype=torch.long), None),
        ("outside-vocab", lambda: torch.tensor([[5, 6, 999]]), "input_ids"),
        ("negative", lambda: torch.tensor([[5, -1, 7]]), "input_ids"),
    ):
        cat.py(
            f"generate.input-ids.{label}",
            f"generate(input_ids=<{label}>, ...)",
            gen_ids(make, None, query_ids, None),
            err("InvalidInputError", field=field_name),
        )
    cat.py(
        "generate.query-ids.outside-vocab",
        "generate(..., query_ids=[[5, 320]])",
        gen_ids(context_ids, None, lambda: torch.tensor([[5, VOCAB_SIZE]]), None),
        err("InvalidInputError", field="query_ids"),
    )
    cat.py(
        "generate.query-ids.batch-mismatch",
        "2 contexts, 3 queries",
        gen_ids(lambda: context_ids().repeat(2, 1), None, lambda: query_ids().repeat(3, 1), None),
        bad,
    )
    for label, make, field_name in (
        ("0.5", lambda: torch.full(context_ids().shape, 0.5), "attention_mask"),
        ("2", lambda: torch.full(context_ids().shape, 2), "attention_mask"),
        ("nan", lambda: torch.full(context_ids().shape, math.nan), "attention_mask"),
        ("wrong-shape", lambda: torch.ones(1, 3), "attention_mask"),
        ("all-zero", lambda: torch.zeros(context_ids().shape, dtype=torch.long), None),
        ("a-list", lambda: [1] * context_ids().shape[1], "attention_mask"),
    ):
        cat.py(
            f"generate.attention-mask.{label}",
            f"generate(input_ids, attention_mask=<{label}>, ...)",
            gen_ids(context_ids, make, query_ids, None),
            err("InvalidInputError", field=field_name),
        )
    cat.py(
        "generate.query-mask.all-zero",
        "generate(..., query_attention_mask=zeros)",
        gen_ids(context_ids, None, query_ids, lambda: torch.zeros(query_ids().shape, dtype=torch.long)),
        bad,
    )
    cat.py(
        "generate.query-mask.2",
        "generate(..., query_attention_mask=2s)",
        gen_ids(context_ids, None, query_ids, lambda: torch.full(query_ids().shape, 2)),
        err("InvalidInputError", field="query_attention_mask"),
    )
    for name, value, extra in (
        ("max_new_tokens", 2.5, {}),
        ("max_new_tokens", 0, {}),
        ("max_new_tokens", -1, {}),
        ("max_new_tokens", "5", {}),
        ("max_new_tokens", True, {}),
        ("min_new_tokens", -1, {}),
        ("top_p", 2.0, {"do_sample": True}),
        ("top_p", 0.0, {"do_sample": True}),
        ("top_p", math.nan, {"do_sample": True}),
        ("temperature", math.nan, {}),
        ("temperature", math.inf, {"do_sample": True}),
        ("temperature", -1.0, {"do_sample": True}),
        ("temperature", 0.0, {"do_sample": True}),
        ("temperature", "hot", {"do_sample": True}),
        ("top_k", -1, {"do_sample": True}),
        ("top_k", 2.5, {"do_sample": True}),
        ("min_p", 2.0, {"do_sample": True}),
        ("repetition_penalty", 0.0, {}),
        ("repetition_penalty", -1.0, {}),
        ("repetition_penalty", math.nan, {}),
        ("repetition_penalty", math.inf, {}),
        ("num_beams", 0, {}),
        ("num_beams", 2.5, {}),
        ("num_return_sequences", 0, {}),
    ):
        settings = {name: value, **extra}
        shown = ", ".join(f"{key}={item!r}" for key, item in settings.items())
        cat.py(
            f"generate.{name}.{_short(value)}",
            f"generate(..., {shown})",
            gen(**settings),
            err("InvalidInputError", status=400, field=name),
            quick=(name, value) == ("top_p", 2.0),
        )
    cat.py(
        "generate.num-return-sequences-greedy",
        "generate(..., num_return_sequences=3) greedy, no beams",
        gen(num_return_sequences=3),
        bad,
    )
    cat.py("generate.unknown-kwarg", "generate(..., bogus_option=1)", gen(bogus_option=1), bad)
    cat.py(
        "generate.mig-options-kwarg",
        "generate(..., mig_options={'coarse': False})",
        gen(mig_options={"coarse": False}),
        bad,
    )
    cat.py(
        "generate.generation-config.wrong-type",
        "generate(..., generation_config={'max_new_tokens': 3})",
        gen(generation_config={"max_new_tokens": 3}),
        bad,
    )
    cat.py("generate.valid.num-beams-2", "generate(..., num_beams=2)", gen(num_beams=2), ans(is_tensor))
    cat.py(
        "generate.valid.sampling",
        "generate(..., do_sample=True, temperature=0.7, top_p=0.9)",
        gen(do_sample=True, temperature=0.7, top_p=0.9),
        ans(is_tensor),
    )
    cat.py(
        "generate.valid.stop-strings",
        "generate(..., stop_strings=['4'])  (byte-level tokenizer)",
        gen(stop_strings=["4"]),
        ans(is_tensor),
    )
    cat.py(
        "generate.stop-strings.word-level",
        "default model generate(..., stop_strings=['9'])  (word-level tokenizer)",
        lambda: fx.default[0].generate(
            context=fx.document, query=QUESTION, tokenizer=fx.default[1], stop_strings=["9"]
        ),
        err("UnsupportedSettingError", status=400, field="stop_strings"),
    )
    cat.py(
        "generate.stop-strings.no-tokenizer",
        "generate(input_ids, ..., stop_strings=['4']) without tokenizer",
        gen_ids(context_ids, None, query_ids, None, stop_strings=["4"]),
        err("InvalidInputError", field="stop_strings"),
    )
    cat.py("generate.stop-strings.int", "generate(..., stop_strings=5)", gen(stop_strings=5), bad)
    cat.py(
        "generate.memory.wrong",
        "generate(query_ids, memory=('a', 'b'))",
        lambda: fx.tiny.generate(query_ids=query_ids(), memory=("a", "b")),
        bad,
    )
    cat.py(
        "generate.memory.wrong-hidden",
        "generate(query_ids, memory=(1, 4, 7) vectors)",
        lambda: fx.tiny.generate(query_ids=query_ids(), memory=(torch.zeros(1, 4, 7), torch.ones(1, 4))),
        bad,
    )
    cat.py(
        "generate.context-encoding.wrong",
        "generate(query_ids, context_encoding='x')",
        lambda: fx.tiny.generate(query_ids=query_ids(), context_encoding="x"),
        bad,
    )
    cat.py(
        "generate.nan-weights",
        "generate on a model with a NaN decoder weight",
        lambda: _nan_tiny(fx).generate(context=CTX, query=QRY, tokenizer=fx.tokenizer, max_new_tokens=4),
        err("NonFiniteError", status=500),
    )
    cat.py(
        "generate.nan-encoder-weights",
        "generate on a model with a NaN encoder weight",
        lambda: _nan_tiny(fx, "encoder").generate(context=CTX, query=QRY, tokenizer=fx.tokenizer, max_new_tokens=4),
        err("NonFiniteError", status=500),
    )
    for label, options in (
        ("unknown", {"bogus": 1}),
        ("not-a-dict", 5),
        ("coarse-string-false", {"coarse": "false"}),
        ("alpha-nan", {"alpha_merge": math.nan}),
        ("alpha-string", {"alpha_select": "high"}),
    ):
        cat.py(
            f"compress.mig-options.{label}",
            f"compress(..., mig_options={options!r})",
            lambda options=options: fx.tiny.compress(ids(CTX), None, ids(QRY), None, mig_options=options),
            err("InvalidInputError", field="mig_options"),
        )
    cat.py(
        "compress.valid.mig-options",
        "compress(..., mig_options={'coarse_redundancy': False})",
        lambda: fx.tiny.compress(ids(CTX), None, ids(QRY), None, mig_options={"coarse_redundancy": False}),
        ans(),
    )
    cat.py(
        "compress.merge-size.0",
        "compress(..., merge_size=0)",
        lambda: fx.tiny.compress(ids(CTX), None, ids(QRY), None, merge_size=0),
        err("InvalidInputError", field="merge_size"),
    )


_DROP = object()


def _short(value) -> str:
    """A value as part of a case id: `2.5`, `-1`, `nan`, `str-5`."""
    return ("str-" + value if isinstance(value, str) else str(value))[:24]


def _nan_tiny(fx: Fixtures, where: str = "decoder"):
    model = copy.deepcopy(fx.tiny)
    with torch.no_grad():
        if where == "decoder":
            model.decoder.model.layers[1].mlp.down_proj.weight[0, 0] = math.nan
        else:
            model.encoder.layers[0].mlp.down_proj.weight.fill_(math.nan)
    return model


def pipeline_cases(cat: Catalogue) -> None:
    fx = cat.fx

    def qa(*args, **kwargs):
        def call():
            values = [arg() if callable(arg) else arg for arg in args]
            return fx.qa(*values, **kwargs)

        return call

    doc = DOCUMENT.read_text(encoding="utf-8")
    bad = err("InvalidInputError", status=400)
    right = ans(value_answer_is(RIGHT))
    cat.py("pipeline.valid", "qa(context=doc, question=...)", qa(context=doc, question=QUESTION), right, quick=True)
    cat.py(
        "pipeline.valid.natural-phrasing",
        "qa(context=doc, question='What is the code of long hill?')",
        qa(context=doc, question="What is the code of long hill?"),
        right,
    )
    cat.py(
        "pipeline.valid.bom",
        "qa(context='\\ufeff' + doc, question=...)",
        qa(context="\ufeff" + doc, question=QUESTION),
        right,
    )
    cat.py(
        "pipeline.valid.crlf",
        "qa(context=doc with CRLF, question=...)",
        qa(context=doc.replace("\n", "\r\n"), question=QUESTION),
        right,
    )
    cat.py(
        "pipeline.valid.token-ids",
        "qa(context=<token ids>, question=<token ids>)",
        lambda: fx.qa(context=fx.default_ids(doc), question=fx.default_ids(QUESTION)),
        right,
    )
    cat.py(
        "pipeline.valid.token-id-tuple",
        "qa(context=tuple(<token ids>), question=...)",
        lambda: fx.qa(context=tuple(fx.default_ids(doc)), question=QUESTION),
        right,
    )
    cat.py(
        "pipeline.valid.questions",
        "qa(context=doc, questions=[q, q'])",
        qa(context=doc, questions=[QUESTION, "What is the code of long hill?"]),
        ans(value_answers_are([RIGHT, RIGHT])),
    )
    cat.py(
        "pipeline.valid.batch",
        "qa([{context, question}] * 2, batch_size=2)",
        qa([{"context": doc, "question": QUESTION}] * 2, batch_size=2),
        ans(value_answers_are([RIGHT, RIGHT])),
    )
    cat.py("pipeline.valid.num-beams", "qa(..., num_beams=2)", qa(context=doc, question=QUESTION, num_beams=2), right)
    cat.py(
        "pipeline.valid.merge-size-4", "qa(..., merge_size=4)", qa(context=doc, question=QUESTION, merge_size=4), right
    )
    for label, kwargs, expect in (
        ("context-int", {"context": 5, "question": QUESTION}, err("InvalidInputError", field="context")),
        ("context-none", {"question": QUESTION}, err("InvalidInputError", field="context")),
        ("context-empty", {"context": "", "question": QUESTION}, err("InvalidInputError", field="context")),
        (
            "context-zero-width",
            {"context": "\u200b\ufeff", "question": QUESTION},
            err("InvalidInputError", field="context"),
        ),
        (
            "context-surrogate",
            {"context": doc[:100] + "\ud800", "question": QUESTION},
            err("InvalidInputError", field="context", message="U+D800"),
        ),
        (
            "context-bools",
            {"context": [True, False, True], "question": QUESTION},
            err("InvalidInputError", field="context"),
        ),
        ("context-floats", {"context": [5, 6.0], "question": QUESTION}, err("InvalidInputError", field="context")),
        (
            "context-outside-vocab",
            {"context": [5, 64], "question": QUESTION},
            err("InvalidInputError", field="context", message="vocabulary of 64"),
        ),
        ("context-negative-id", {"context": [5, -1], "question": QUESTION}, err("InvalidInputError", field="context")),
        ("context-huge-id", {"context": [5, 2**70], "question": QUESTION}, err("InvalidInputError", field="context")),
        ("context-empty-list", {"context": [], "question": QUESTION}, err("InvalidInputError", field="context")),
        (
            "context-tensor",
            {"context": torch.tensor([5, 6]), "question": QUESTION},
            err("InvalidInputError", field="context"),
        ),
        ("context-dict", {"context": {"text": doc}, "question": QUESTION}, err("InvalidInputError", field="context")),
        ("question-empty", {"context": doc, "question": ""}, err("InvalidInputError", field="question")),
        ("question-zero-width", {"context": doc, "question": "\u200b"}, err("InvalidInputError", field="question")),
        (
            "question-surrogate",
            {"context": doc, "question": "what \udc80 ?"},
            err("InvalidInputError", field="question"),
        ),
        ("question-int", {"context": doc, "question": 7}, err("InvalidInputError", field="question")),
        ("question-bool-list", {"context": doc, "question": [True]}, err("InvalidInputError", field="question")),
        ("questions-string", {"context": doc, "questions": QUESTION}, err("InvalidInputError", field="questions")),
        ("questions-empty", {"context": doc, "questions": []}, err("InvalidInputError", field="questions")),
        (
            "questions-none-item",
            {"context": doc, "questions": [QUESTION, None]},
            err("InvalidInputError", field="questions[1]"),
        ),
        (
            "questions-empty-item",
            {"context": doc, "questions": [QUESTION, " "]},
            err("InvalidInputError", field="questions[1]"),
        ),
        ("question-and-questions", {"context": doc, "question": QUESTION, "questions": [QUESTION]}, bad),
        (
            "merge-size-0",
            {"context": doc, "question": QUESTION, "merge_size": 0},
            err("InvalidInputError", field="merge_size"),
        ),
        (
            "merge-size-negative",
            {"context": doc, "question": QUESTION, "merge_size": -1},
            err("InvalidInputError", field="merge_size"),
        ),
        (
            "merge-size-huge",
            {"context": doc, "question": QUESTION, "merge_size": 10**30},
            err("InvalidInputError", field="merge_size"),
        ),
        (
            "merge-size-string",
            {"context": doc, "question": QUESTION, "merge_size": "4"},
            err("InvalidInputError", field="merge_size"),
        ),
        (
            "merge-size-float",
            {"context": doc, "question": QUESTION, "merge_size": 2.5},
            err("InvalidInputError", field="merge_size"),
        ),
        (
            "merge-size-bool",
            {"context": doc, "question": QUESTION, "merge_size": True},
            err("InvalidInputError", field="merge_size"),
        ),
        (
            "max-new-tokens-2.5",
            {"context": doc, "question": QUESTION, "max_new_tokens": 2.5},
            err("InvalidInputError", field="max_new_tokens"),
        ),
        (
            "max-new-tokens-0",
            {"context": doc, "question": QUESTION, "max_new_tokens": 0},
            err("InvalidInputError", field="max_new_tokens"),
        ),
        (
            "top-p-2",
            {"context": doc, "question": QUESTION, "do_sample": True, "top_p": 2},
            err("InvalidInputError", field="top_p"),
        ),
        (
            "temperature-nan",
            {"context": doc, "question": QUESTION, "temperature": math.nan},
            err("InvalidInputError", field="temperature"),
        ),
        (
            "temperature-0-sampling",
            {"context": doc, "question": QUESTION, "do_sample": True, "temperature": 0},
            err("InvalidInputError", field="temperature"),
        ),
        (
            "repetition-penalty-0",
            {"context": doc, "question": QUESTION, "repetition_penalty": 0},
            err("InvalidInputError", field="repetition_penalty"),
        ),
        (
            "repetition-penalty-negative",
            {"context": doc, "question": QUESTION, "repetition_penalty": -1},
            err("InvalidInputError", field="repetition_penalty"),
        ),
        (
            "repetition-penalty-nan",
            {"context": doc, "question": QUESTION, "repetition_penalty": math.nan},
            err("InvalidInputError", field="repetition_penalty"),
        ),
        (
            "stop-strings-word-level",
            {"context": doc, "question": QUESTION, "stop_strings": ["9"]},
            err("UnsupportedSettingError", field="stop_strings"),
        ),
        ("unknown-option", {"context": doc, "question": QUESTION, "bogus_option": 1}, bad),
        (
            "mig-options-unknown",
            {"context": doc, "question": QUESTION, "mig_options": {"bogus": 1}},
            err("InvalidInputError", field="mig_options"),
        ),
    ):
        cat.py(
            f"pipeline.{label}",
            f"qa({', '.join(f'{k}={v!r:.30}' for k, v in kwargs.items())})",
            qa(**kwargs),
            expect,
            quick=label in ("context-zero-width", "merge-size-huge"),
        )
    for label, args, kwargs, expect in (
        ("inputs-empty-list", ([],), {}, bad),
        ("inputs-string", (["a text"],), {}, bad),
        (
            "inputs-unknown-key",
            ({"context": doc, "question": QUESTION, "answer": "x"},),
            {},
            err("InvalidInputError", field="answer"),
        ),
        ("inputs-positional-and-keyword", ({"context": doc, "question": QUESTION},), {"context": doc}, bad),
        (
            "inputs-several-questions-batched",
            ([{"context": doc, "questions": [QUESTION]}] * 2,),
            {"batch_size": 2},
            bad,
        ),
        ("inputs-none", (), {}, bad),
    ):
        cat.py(f"pipeline.{label}", f"qa(*{args!r:.50}, **{kwargs!r:.30})", qa(*args, **kwargs), expect)
    from transformers import pipeline

    for name, model, message in broken_models(fx):
        if name in (
            "missing",
            "other-model-type",
            "weights-truncated",
            "nan-decoder",
            "no-tokenizer",
            "no-config",
            "config-merge-size-string",
        ):
            cat.py(
                f"pipeline.model.{name}",
                f"pipeline('comi-qa', model=<{name}>), then a valid question",
                lambda model=model: pipeline("comi-qa", model=model() if callable(model) else model)(
                    context=doc, question=QUESTION
                ),
                err(message=message),
            )
            if name == "no-tokenizer":  # from_pretrained loads no tokenizer
                continue
            sends = f"COMIForConditionalGeneration.from_pretrained(<{name}>)"
            expect = err(message="not a COMI" if name == "other-model-type" else message)
            if name == "no-config":
                # In a process of its own: without config.json, from_pretrained builds COMIConfig()'s
                # default backbone (7B parameters) and allocates it; the kernel killed this process.
                cat.py_isolated(f"from-pretrained.{name}", sends, from_pretrained, (model,), expect)
            else:
                cat.py(f"from-pretrained.{name}", sends, lambda model=model: from_pretrained(_made(model)), expect)


def client_cases(cat: Catalogue) -> None:
    """`COMIServingClient`: its checks before any decoding (its decoder an address nothing answers),
    and with a real vLLM server (`server=True`)."""
    fx = cat.fx
    from comi_hf.serving import COMIServingClient

    dead = "http://127.0.0.1:9"

    def client():
        return fx._once("client-dead", lambda: COMIServingClient.from_pretrained(fx.served_dir, vllm_url=dead))

    def live():
        url = cat.server.get("vllm")
        return fx._once("client-live", lambda: COMIServingClient.from_pretrained(fx.served_dir, vllm_url=url))

    def ask(which=client, **kwargs):
        options = {"context": SERVED_CONTEXT, "question": SERVED_QUESTION, "max_new_tokens": 4}
        options.update(kwargs)
        options = {key: value for key, value in options.items() if value is not _DROP}
        return lambda: which().answer(**options)

    bad = err("InvalidInputError", status=400)
    cat.py(
        "client.no-decoder",
        "COMIServingClient.from_pretrained(model)",
        lambda: COMIServingClient.from_pretrained(fx.served_dir),
        err("InvalidInputError", field="vllm_url"),
    )
    cat.py(
        "client.both-decoders",
        "from_pretrained(model, vllm_url=..., llm=object())",
        lambda: COMIServingClient.from_pretrained(fx.served_dir, vllm_url=dead, llm=object()),
        bad,
    )
    cat.py(
        "client.model.missing",
        "from_pretrained('/nonexistent/model', vllm_url=...)",
        lambda: COMIServingClient.from_pretrained("/nonexistent/model", vllm_url=dead),
        err("UsageError"),
    )
    cat.py(
        "client.model.other-type",
        "from_pretrained(<a llama model>, vllm_url=...)",
        lambda: COMIServingClient.from_pretrained(comi_hf.DEFAULT_BACKBONE, vllm_url=dead),
        err("ModelLoadError"),
    )
    cat.py(
        "client.vllm-url.ftp",
        "from_pretrained(model, vllm_url='ftp://x').answer(...)",
        lambda: COMIServingClient.from_pretrained(fx.served_dir, vllm_url="ftp://127.0.0.1:8000").answer(
            context=SERVED_CONTEXT, question=SERVED_QUESTION
        ),
        err(status=400, message="ftp"),
    )
    cat.py(
        "client.vllm-url.int",
        "from_pretrained(model, vllm_url=8000)",
        lambda: COMIServingClient.from_pretrained(fx.served_dir, vllm_url=8000),
        bad,
    )
    cat.py(
        "client.decoder-unreachable",
        "client.answer(valid) with nothing at the vLLM URL",
        ask(),
        err("DecoderUnavailableError", status=503),
        quick=True,
    )
    for label, kwargs, expect in (
        ("context-int", {"context": 5}, err("InvalidInputError", field="context")),
        ("context-empty", {"context": ""}, err("InvalidInputError", field="context")),
        ("context-zero-width", {"context": "\u200b\u200b"}, err("InvalidInputError", field="context")),
        ("context-surrogate", {"context": "a \ud800"}, err("InvalidInputError", field="context")),
        ("context-bools", {"context": [True, False]}, err("InvalidInputError", field="context")),
        ("context-outside-vocab", {"context": [5, 99999]}, err("InvalidInputError", field="context")),
        ("context-huge-id", {"context": [5, 2**70]}, err("InvalidInputError", field="context")),
        ("question-empty", {"question": ""}, err("InvalidInputError", field="question")),
        ("question-none", {"question": _DROP}, bad),
        ("questions-empty", {"question": _DROP, "questions": []}, err("InvalidInputError", field="questions")),
        ("merge-size-0", {"merge_size": 0}, err("InvalidInputError", field="merge_size")),
        ("merge-size-huge", {"merge_size": 10**30}, err("InvalidInputError", field="merge_size")),
        ("merge-size-string", {"merge_size": "4"}, err("InvalidInputError", field="merge_size")),
        ("max-new-tokens-2.5", {"max_new_tokens": 2.5}, err("InvalidInputError", field="max_new_tokens")),
        ("max-new-tokens-0", {"max_new_tokens": 0}, err("InvalidInputError", field="max_new_tokens")),
        ("temperature-nan", {"temperature": math.nan}, err("InvalidInputError", field="temperature")),
        ("top-p-2", {"do_sample": True, "top_p": 2.0}, err("InvalidInputError", field="top_p")),
        ("repetition-penalty-0", {"repetition_penalty": 0.0}, err("InvalidInputError", field="repetition_penalty")),
        ("num-beams-2", {"num_beams": 2}, err("UnsupportedSettingError", field="num_beams")),
        ("no-repeat-ngram", {"no_repeat_ngram_size": 2}, err("UnsupportedSettingError")),
        ("streamer", {"streamer": object()}, err("UnsupportedSettingError")),
        ("unknown-option", {"bogus_option": 1}, bad),
        ("seed-string", {"seed": "seven"}, err("InvalidInputError", field="seed")),
        ("mig-options", {"mig_options": {"bogus": 1}}, bad),
    ):
        cat.py(
            f"client.{label}",
            f"client.answer({', '.join(f'{k}={v!r:.30}' for k, v in kwargs.items())})",
            ask(**kwargs),
            expect,
        )
    # ---- with vLLM
    cat.py("client.vllm.valid", "client.answer(context, question) on vLLM", ask(live), ans(), server=True)
    cat.py(
        "client.vllm.valid.questions",
        "client.answer(context, questions=[...]) on vLLM",
        ask(live, question=_DROP, questions=[SERVED_QUESTION, "which city is north ?"]),
        ans(),
        server=True,
    )
    cat.py(
        "client.vllm.valid.stop-strings",
        "client.answer(..., stop_strings=['4']) on vLLM",
        ask(live, stop_strings=["4"]),
        ans(),
        server=True,
    )
    cat.py(
        "client.vllm.valid.sampling",
        "client.answer(..., do_sample=True, seed=3, num_return_sequences=2)",
        ask(live, do_sample=True, seed=3, num_return_sequences=2),
        ans(),
        server=True,
    )
    cat.py(
        "client.vllm.num-beams",
        "client.answer(..., num_beams=2) on vLLM",
        ask(live, num_beams=2),
        err("UnsupportedSettingError"),
        server=True,
    )
    cat.py(
        "client.vllm.past-max-model-len",
        "client.answer(..., max_new_tokens=2000) (vLLM max_model_len 1024)",
        ask(live, max_new_tokens=2000),
        err(status=(400, 413)),
        server=True,
    )
    cat.py(
        "client.vllm.seed-huge",
        "client.answer(..., do_sample=True, seed=2**70)",
        ask(live, do_sample=True, seed=2**70),
        err(status=400),
        server=True,
    )
    cat.py(
        "client.vllm.wrong-model-name",
        "from_pretrained(..., vllm_model='nope').answer(valid)",
        lambda: COMIServingClient.from_pretrained(fx.served_dir, vllm_url=cat.server["vllm"], vllm_model="nope").answer(
            context=SERVED_CONTEXT, question=SERVED_QUESTION
        ),
        err(status=(400, 502)),
        server=True,
    )


# --------------------------------------------------------------------------- HTTP
def http_cases(cat: Catalogue) -> None:
    good = {"context": SERVED_CONTEXT, "question": SERVED_QUESTION, "max_new_tokens": 4}

    def with_(**changes):
        body = dict(good)
        for key, value in changes.items():
            if value is _DROP:
                body.pop(key, None)
            else:
                body[key] = value
        return body

    def same_answer_as(reference: dict):
        def check(raw: Raw):
            base = cat.server.get("main")
            expected = run_http(base + "/v1/answer", "POST", json.dumps(reference).encode(), _headers(), 120).value
            got = raw.value
            key = "answer" if isinstance(got, dict) and "answer" in got else "answers"
            if not isinstance(got, dict) or not isinstance(expected, dict) or got.get(key) != expected.get(key):
                return f"answer {_describe_answer(got)}, plain request {_describe_answer(expected)}"
            return None

        check.__doc__ = "the same answer as the plain request"
        return check

    def answered_shape(raw: Raw):
        """a result with answer, context_tokens, memory_tokens and compression_ratio"""
        value = raw.value
        keys = {"context_tokens", "memory_tokens", "compression_ratio"}
        if not isinstance(value, dict) or not keys <= set(value) or not ({"answer", "answers"} & set(value)):
            return f"result {_describe_answer(value)}"
        return None

    def health_down(raw: Raw):
        """a health report saying the decoder cannot be reached"""
        decoder = (raw.value or {}).get("decoder") if isinstance(raw.value, dict) else None
        return None if isinstance(decoder, dict) and decoder.get("reachable") is False else f"health {raw.value}"

    ok = ans(answered_shape)
    e400 = err(status=400)
    cat.http("http.valid", "a context and a question", good, ok)
    cat.http(
        "http.valid.questions",
        "questions: [q, q']",
        with_(question=_DROP, questions=[SERVED_QUESTION, "which city is north ?"]),
        ok,
    )
    tokenizer = cat.fx.tokenizer
    context_ids = tokenizer(SERVED_CONTEXT, add_special_tokens=False)["input_ids"]
    question_ids = tokenizer(SERVED_QUESTION, add_special_tokens=False)["input_ids"]
    cat.http(
        "http.valid.token-ids",
        "context and question as token ids",
        with_(context=context_ids, question=question_ids),
        ans(same_answer_as(good)),
    )
    cat.http(
        "http.valid.bom",
        "the context with a leading byte-order mark",
        with_(context="\ufeff" + SERVED_CONTEXT),
        ans(same_answer_as(good)),
    )
    cat.http(
        "http.valid.return-token-ids",
        "return_token_ids: true",
        with_(return_token_ids=True),
        ans(lambda raw: None if "token_ids" in (raw.value or {}) else "no token_ids"),
    )
    cat.http(
        "http.valid.sampling", "do_sample, temperature 0.7, seed 3", with_(do_sample=True, temperature=0.7, seed=3), ok
    )
    cat.http("http.valid.stop-strings", "stop_strings: ['4']", with_(stop_strings=["4"]), ok)
    cat.http("http.valid.merge-size-1", "merge_size 1", with_(merge_size=1), ok)
    cat.http("http.valid.merge-size-max", "merge_size 2147483647", with_(merge_size=2**31 - 1), ok)
    cat.http(
        "http.valid.unicode",
        "a context with non-ASCII text (é, 漢字, emoji)",
        with_(context=SERVED_CONTEXT + " café 漢字 🙂"),
        ok,
    )
    cat.http(
        "http.valid.charset",
        "Content-Type: application/json; charset=utf-8",
        good,
        ok,
        headers={"Content-Type": "application/json; charset=utf-8"},
    )
    cat.http(
        "http.health",
        "GET /health",
        None,
        ans(lambda raw: None if (raw.value or {}).get("status") == "ok" else f"{raw.value}"),
        method="GET",
        path="/health",
        key=None,
    )
    # ---- the body
    for label, raw, expect in (
        ("malformed", b"{not json", e400),
        ("truncated", json.dumps(good).encode()[:-5], e400),
        ("empty-body", b"", e400),
        ("null", b"null", e400),
        ("list", b"[]", e400),
        ("number", b"42", e400),
        ("string", b'"a context"', e400),
        ("trailing-garbage", json.dumps(good).encode() + b" xyz", e400),
        ("invalid-utf8", b'{"context": "\xff\xfe long", "question": "q ?"}', e400),
        ("utf16", json.dumps(good).encode("utf-16"), ans(same_answer_as(good))),
        ("deep-nesting", b'{"context": ' + b"[" * 100_000 + b"]" * 100_000 + b', "question": "q ?"}', e400),
        ("nan-literal", b'{"context": "a text", "question": "q ?", "temperature": NaN}', err(400, field="temperature")),
        (
            "infinity-literal",
            b'{"context": "a text", "question": "q ?", "temperature": Infinity}',
            err(400, field="temperature"),
        ),
        ("huge-float", b'{"context": "a text", "question": "q ?", "top_p": 1e400}', err(400, field="top_p")),
        ("surrogate-context", b'{"context": "a \\ud800 b", "question": "q ?"}', err(400, field="context")),
        ("surrogate-question", b'{"context": "a text", "question": "q \\udfff ?"}', err(400, field="question")),
        (
            "surrogate-questions",
            b'{"context": "a text", "questions": ["q ?", "\\ud83d"]}',
            err(400, field="questions[1]"),
        ),
        (
            "surrogate-pair-ok",
            b'{"context": "the code \\ud83d\\ude42 of red river is 4", "question": "q ?", "max_new_tokens": 2}',
            ok,
        ),
        ("nul-escape", b'{"context": "\\u0000\\u0000", "question": "q ?"}', err(400, field="context")),
        ("duplicate-keys", b'{"context": "a text", "question": "q ?", "question": ""}', err(400, field="question")),
    ):
        cat.http(f"http.body.{label}", f"body {raw[:60]!r}", raw=raw, expect=expect)
    # ---- wrong types and values
    for label, body, expect in (
        ("context-int", with_(context=5), e400),
        ("context-null", with_(context=None), e400),
        ("context-missing", with_(context=_DROP), e400),
        ("context-bool", with_(context=True), e400),
        ("context-object", with_(context={"text": "a"}), e400),
        ("context-empty", with_(context=""), err(400, field="context")),
        ("context-spaces", with_(context="  \n "), err(400, field="context")),
        ("context-zero-width", with_(context="\u200b\u2060\ufeff"), err(400, field="context")),
        ("context-ids-empty", with_(context=[]), err(400, field="context")),
        ("context-ids-outside", with_(context=[5, 99999]), err(400, field="context")),
        ("context-ids-negative", with_(context=[5, -1]), err(400, field="context")),
        ("context-ids-floats", with_(context=[5.5, 6]), e400),
        ("context-ids-bools", with_(context=[True, False]), e400),
        ("context-ids-huge", with_(context=[2**70]), e400),
        ("context-ids-strings", with_(context=["5", "6"]), e400),
        ("question-int", with_(question=5), e400),
        ("question-empty", with_(question=""), err(400, field="question")),
        ("question-missing", with_(question=_DROP), e400),
        ("question-null", with_(question=None), e400),
        ("question-and-questions", with_(questions=[SERVED_QUESTION]), e400),
        ("questions-string", with_(question=_DROP, questions=SERVED_QUESTION), e400),
        ("questions-empty", with_(question=_DROP, questions=[]), err(400, field="questions")),
        ("questions-null-item", with_(question=_DROP, questions=[SERVED_QUESTION, None]), e400),
        (
            "questions-empty-item",
            with_(question=_DROP, questions=[SERVED_QUESTION, ""]),
            err(400, field="questions[1]"),
        ),
        ("questions-number-item", with_(question=_DROP, questions=[5.5]), e400),
        ("merge-size-0", with_(merge_size=0), err(400, field="merge_size")),
        ("merge-size-negative", with_(merge_size=-1), err(400, field="merge_size")),
        ("merge-size-huge", with_(merge_size=10**30), err(400, field="merge_size")),
        ("merge-size-2-63", with_(merge_size=2**63), err(400, field="merge_size")),
        ("merge-size-float", with_(merge_size=2.5), e400),
        ("merge-size-word", with_(merge_size="four"), e400),
        ("merge-size-numeric-string", with_(merge_size="4"), e400),
        ("merge-size-integral-float", with_(merge_size=4.0), e400),
        ("merge-size-bool", with_(merge_size=True), e400),
        ("max-new-tokens-0", with_(max_new_tokens=0), err(400, field="max_new_tokens")),
        ("max-new-tokens-negative", with_(max_new_tokens=-1), err(400, field="max_new_tokens")),
        ("max-new-tokens-float", with_(max_new_tokens=2.5), e400),
        ("max-new-tokens-string", with_(max_new_tokens="5"), e400),
        ("max-new-tokens-huge", with_(max_new_tokens=10**9), err((400, 413))),
        ("max-new-tokens-past-vllm", with_(max_new_tokens=2000), err((400, 413))),
        ("temperature-negative", with_(do_sample=True, temperature=-1), err(400, field="temperature")),
        ("temperature-0-sampling", with_(do_sample=True, temperature=0), err(400, field="temperature")),
        ("temperature-string", with_(temperature="hot"), e400),
        ("top-p-2", with_(do_sample=True, top_p=2), err(400, field="top_p")),
        ("top-p-0", with_(do_sample=True, top_p=0), err(400, field="top_p")),
        ("top-k-negative", with_(do_sample=True, top_k=-1), err(400, field="top_k")),
        ("min-p-2", with_(do_sample=True, min_p=2), err(400, field="min_p")),
        ("repetition-penalty-0", with_(repetition_penalty=0), err(400, field="repetition_penalty")),
        ("repetition-penalty-negative", with_(repetition_penalty=-1), err(400, field="repetition_penalty")),
        ("num-beams-2", with_(num_beams=2), err(400, field="num_beams")),
        ("num-beams-0", with_(num_beams=0), e400),
        ("num-return-sequences-0", with_(num_return_sequences=0), e400),
        ("num-return-sequences-greedy", with_(num_return_sequences=3), e400),
        ("min-new-tokens-past-max", with_(min_new_tokens=10, max_new_tokens=4), e400),
        ("seed-huge", with_(do_sample=True, seed=2**70), e400),
        ("seed-string", with_(seed="x"), e400),
        ("do-sample-string", with_(do_sample="yes"), e400),
        ("return-token-ids-string", with_(return_token_ids="yes"), e400),
        ("stop-strings-int", with_(stop_strings=5), e400),
        ("stop-strings-empty-string", with_(stop_strings=[""]), e400),
        ("unknown-field", with_(beams=2), err(400, message="beams")),
        ("unknown-field-answer", with_(answer="4 8 2 1"), err(400, message="answer")),
        ("mig-options", with_(mig_options={"coarse": False}), e400),
        ("too-long-context", with_(context=" ".join(WORDS * 30)), err(413, field="context")),
        ("too-long-token-ids", with_(context=context_ids * 30), err(413, field="context")),
    ):
        cat.http(f"http.{label}", f"{json.dumps(body)[:90]}", body, expect)
    big = json.dumps(with_(context="x " * 140_000)).encode()
    cat.http("http.body-too-large", f"a body of {len(big)} bytes (limit 262144)", raw=big, expect=err(413))
    # ---- keys, methods, routes
    cat.http("http.key.missing", "no Authorization header", good, err(401), key=None)
    cat.http("http.key.wrong", "Authorization: Bearer wrong", good, err(401), key="wrong")
    cat.http(
        "http.key.lower-case-scheme",
        "Authorization: bearer secret (the scheme's case differs; RFC 7235 calls it case-insensitive)",
        good,
        ans(),
        key=None,
        headers={"Authorization": f"bearer {API_KEY}"},
    )
    cat.http(
        "http.key.non-ascii",
        "Authorization: Bearer sécret",
        good,
        err(401),
        key=None,
        headers={"Authorization": "Bearer s\u00e9cret"},
    )
    cat.http(
        "http.content-type.text",
        "Content-Type: text/plain with a JSON body (taken as JSON on these paths)",
        raw=json.dumps(good).encode(),
        expect=ok,
        headers={"Content-Type": "text/plain"},
    )
    cat.http(
        "http.content-type.form",
        "Content-Type: application/x-www-form-urlencoded",
        raw=b"context=a&question=b",
        expect=err((400, 415)),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    cat.http("http.method.get", "GET /v1/answer", None, err(405), method="GET")
    cat.http("http.method.put", "PUT /v1/answer", good, err(405), method="PUT")
    cat.http("http.route.unknown", "POST /v1/nope", good, err(404), path="/v1/nope")
    cat.http("http.route.health-post", "POST /health", good, err(405), path="/health")
    cat.http("http.decoder-down", "a valid request to a comi-serve whose vLLM is down", good, err(503), server="down")
    cat.http(
        "http.decoder-down.health",
        "GET /health on a comi-serve whose vLLM is down",
        None,
        ans(health_down, status=503),
        method="GET",
        path="/health",
        server="down",
    )
    openai_cases(cat)


def openai_cases(cat: Catalogue) -> None:
    """OpenAI's API on comi-serve: /v1/chat/completions, /v1/completions, /v1/models, and streams."""
    chat = {
        "model": "comi",
        "messages": [{"role": "user", "content": SERVED_QUESTION}],
        "documents": [SERVED_CONTEXT],
        "max_tokens": 4,
    }
    completion = {"model": "comi", "prompt": SERVED_QUESTION, "documents": [SERVED_CONTEXT], "max_tokens": 4}

    def changed(body, **changes):
        body = dict(body)
        for key, value in changes.items():
            if value is _DROP:
                body.pop(key, None)
            else:
                body[key] = value
        return body

    def choices(count: int):
        def check(raw: Raw):
            value = raw.value
            got = len(value.get("choices", [])) if isinstance(value, dict) else None
            return None if got == count and "comi" in value else f"{got} choices: {_describe_answer(value)}"

        check.__doc__ = f"{count} choice(s) and COMI's figures"
        return check

    def streamed(raw: Raw):
        """server-sent events ending with `data: [DONE]`, none of them an error"""
        text = raw.stdout
        if "text/event-stream" not in raw.content_type or not text.rstrip().endswith("data: [DONE]"):
            return f"not an event stream ending with [DONE]: {text[-120:]!r}"
        return '"error"' in text and f"an error event: {text[:200]!r}" or None

    def models(raw: Raw):
        """a model list naming `comi`"""
        data = (raw.value or {}).get("data") if isinstance(raw.value, dict) else None
        return None if data and data[0].get("id") == "comi" else f"{raw.value}"

    def metrics(raw: Raw):
        """Prometheus metrics"""
        return None if "# HELP" in raw.stdout else f"{raw.stdout[:120]!r}"

    e400 = err(400)
    path = "/v1/chat/completions"
    cat.http("openai.chat.valid", "a user message about documents", chat, ans(choices(1)), path=path)
    cat.http(
        "openai.chat.valid.titled-documents",
        "documents as {text, title} objects",
        changed(chat, documents=[{"text": SERVED_CONTEXT, "title": "Rivers"}, "old mill is north ."]),
        ans(choices(1)),
        path=path,
    )
    cat.http(
        "openai.chat.valid.content-parts",
        "content as text parts",
        changed(chat, messages=[{"role": "user", "content": [{"type": "text", "text": SERVED_QUESTION}]}]),
        ans(choices(1)),
        path=path,
    )
    cat.http(
        "openai.chat.valid.sampling",
        "temperature 1 (an integer), top_p 1, n 2, seed 3",
        changed(chat, temperature=1, top_p=1, n=2, seed=3),
        ans(choices(2)),
        path=path,
    )
    cat.http("openai.chat.valid.stream", "stream: true", changed(chat, stream=True), ans(streamed), path=path)
    cat.http("openai.chat.valid.user", "user: an end user's id", changed(chat, user="u-1"), ans(choices(1)), path=path)
    for label, body, expect in (
        ("malformed", None, e400),
        ("model-wrong", changed(chat, model="gpt-4o"), err(404, field="model")),
        ("model-missing", changed(chat, model=_DROP), err(400, field="model")),
        ("messages-missing", changed(chat, messages=_DROP), err(400, field="messages")),
        ("messages-empty", changed(chat, messages=[]), err(400, field="messages")),
        ("messages-not-list", changed(chat, messages="what ?"), err(400, field="messages")),
        (
            "system-message",
            changed(chat, messages=[{"role": "system", "content": "be brief"}, *chat["messages"]]),
            err(400, field="messages[0]"),
        ),
        ("two-user-messages", changed(chat, messages=chat["messages"] * 2), err(400, field="messages")),
        ("message-not-object", changed(chat, messages=["what ?"]), err(400)),
        (
            "content-int",
            changed(chat, messages=[{"role": "user", "content": 5}]),
            err(400, field="messages[0].content"),
        ),
        (
            "content-empty",
            changed(chat, messages=[{"role": "user", "content": ""}]),
            err(400, field="messages[0].content"),
        ),
        (
            "content-zero-width",
            changed(chat, messages=[{"role": "user", "content": "\u200b"}]),
            err(400, field="messages[0].content"),
        ),
        (
            "content-image",
            changed(chat, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
            err(400, field="messages[0].content"),
        ),
        ("content-surrogate", None, err(400, field="messages[0].content")),
        ("documents-missing", changed(chat, documents=_DROP), err(400, field="documents")),
        ("documents-empty", changed(chat, documents=[]), err(400, field="documents")),
        ("documents-int", changed(chat, documents=[5]), e400),
        ("documents-string", changed(chat, documents=SERVED_CONTEXT), e400),
        ("documents-empty-text", changed(chat, documents=[""]), err(400, field=("documents", "documents[0]"))),
        ("document-unknown-key", changed(chat, documents=[{"text": "a", "body": "b"}]), e400),
        ("tools", changed(chat, tools=[{"type": "function", "function": {"name": "f"}}]), err(400, field="tools")),
        ("logprobs", changed(chat, logprobs=True), err(400, field="logprobs")),
        ("presence-penalty", changed(chat, presence_penalty=0.5), err(400, field="presence_penalty")),
        ("response-format", changed(chat, response_format={"type": "json_object"}), err(400, field="response_format")),
        ("unknown-field", changed(chat, foo=1), err(400, field="foo")),
        ("n-0", changed(chat, n=0), err(400, field="n", message="`n`")),
        ("n-greedy", changed(chat, n=2), e400),
        ("n-over-limit", changed(chat, n=4, temperature=1), err(413)),
        ("max-tokens-0", changed(chat, max_tokens=0), err(400, field="max_tokens", message="`max_tokens`")),
        ("max-tokens-both", changed(chat, max_completion_tokens=4), err(400, field="max_completion_tokens")),
        ("max-tokens-over-limit", changed(chat, max_tokens=65), err(413, field="max_tokens")),
        ("max-tokens-string", changed(chat, max_tokens="four"), e400),
        ("top-p-greedy", changed(chat, top_p=0.5), err(400, field="top_p")),
        ("top-p-2", changed(chat, temperature=1, top_p=2), err(400, field="top_p")),
        ("temperature-negative", changed(chat, temperature=-1), err(400, field="temperature")),
        ("temperature-nan", None, err(400, field="temperature")),
        ("stop-int", changed(chat, stop=5), e400),
        ("stop-empty-string", changed(chat, stop=[""]), err(400, field="stop", message="`stop`")),
        ("seed-huge", changed(chat, seed=2**70), err(400, field="seed")),
        ("merge-size-0", changed(chat, merge_size=0), err(400, field="merge_size")),
        ("stream-options-string", changed(chat, stream=True, stream_options={"include_usage": "yes"}), e400),
        ("stream-bad-input", changed(chat, stream=True, merge_size=0), err(400, field="merge_size")),
        ("too-long-documents", changed(chat, documents=[" ".join(WORDS * 30)]), err(413, field="documents")),
    ):
        raw = None
        if label == "malformed":
            raw = b'{"model": "comi", "messages": ['
        elif label == "content-surrogate":
            raw = json.dumps(chat).replace(SERVED_QUESTION, "what \\udc00 ?").encode()
        elif label == "temperature-nan":
            raw = json.dumps(chat)[:-1].encode() + b', "temperature": NaN}'
        cat.http(
            f"openai.chat.{label}", f"{(raw or json.dumps(body).encode())[:90]!r}", body, expect, raw=raw, path=path
        )
    path = "/v1/completions"
    cat.http("openai.completion.valid", "a prompt about documents", completion, ans(choices(1)), path=path)
    cat.http(
        "openai.completion.valid.prompts",
        "two prompts",
        changed(completion, prompt=[SERVED_QUESTION, "which city is north ?"]),
        ans(choices(2)),
        path=path,
    )
    cat.http(
        "openai.completion.valid.stream", "stream: true", changed(completion, stream=True), ans(streamed), path=path
    )
    for label, body, expect in (
        ("prompt-missing", changed(completion, prompt=_DROP), err(400, field="prompt")),
        ("prompt-empty-list", changed(completion, prompt=[]), err(400, field="prompt")),
        ("prompt-int", changed(completion, prompt=5), e400),
        ("prompt-token-ids", changed(completion, prompt=[5, 6, 7]), e400),
        ("prompt-empty", changed(completion, prompt=""), err(400, field="prompt")),
        (
            "prompt-empty-item",
            changed(completion, prompt=[SERVED_QUESTION, " "]),
            err(400, field=("prompt", "prompt[1]")),
        ),
        ("prompts-over-limit", changed(completion, prompt=[SERVED_QUESTION] * 5), err(413, field="questions")),
        ("echo", changed(completion, echo=True), err(400, field="echo")),
        ("best-of", changed(completion, best_of=2), err(400, field="best_of")),
        ("suffix", changed(completion, suffix="x"), err(400, field="suffix")),
    ):
        cat.http(f"openai.completion.{label}", f"{json.dumps(body)[:90]}", body, expect, path=path)
    cat.http("openai.models", "GET /v1/models", None, ans(models), method="GET", path="/v1/models")
    cat.http(
        "openai.models.no-key",
        "GET /v1/models without the key",
        None,
        err(401),
        method="GET",
        path="/v1/models",
        key=None,
    )
    cat.http("http.metrics", "GET /metrics", None, ans(metrics), method="GET", path="/metrics")
    good = {"context": SERVED_CONTEXT, "question": SERVED_QUESTION, "max_new_tokens": 4}
    cat.http("http.valid.stream", "/v1/answer with stream: true", dict(good, stream=True), ans(streamed))
    cat.http(
        "http.stream.bad-input",
        "/v1/answer, stream: true, merge_size 0",
        dict(good, stream=True, merge_size=0),
        err(400, field="merge_size"),
    )
    cat.http("http.stream.string", "/v1/answer, stream: 'yes'", dict(good, stream="yes"), err(400, field="stream"))
    cat.http(
        "http.questions-over-limit",
        "5 questions (limit 4)",
        {"context": SERVED_CONTEXT, "questions": [SERVED_QUESTION] * 5},
        err(413, field="questions"),
    )
    cat.http(
        "http.sequences-over-limit",
        "num_return_sequences 4 (limit 3)",
        dict(good, do_sample=True, num_return_sequences=4),
        err(413, field="num_return_sequences"),
    )
    cat.http(
        "http.new-tokens-over-limit",
        "max_new_tokens 65 (limit 64)",
        dict(good, max_new_tokens=65),
        err(413, field="max_new_tokens"),
    )


def _headers() -> dict:
    return {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}


# --------------------------------------------------------------------------- servers
class Servers:
    """A vLLM server (started in a thread while the other cases run) and two comi-serve processes:
    one in front of it, one whose vLLM URL answers nothing. Each dies with this process
    (bench/server_processes.py)."""

    def __init__(self, fx: Fixtures, log_dir: Path):
        self.fx = fx
        self.log_dir = log_dir
        self.vllm = None
        self.processes: list = []
        self.error: str | None = None
        self.thread: threading.Thread | None = None

    def start_vllm(self) -> None:
        from server_processes import VLLMServer, find_vllm_python

        decoder = Path(self.fx.served_dir).parent / "decoder"

        def start():
            python = find_vllm_python()
            if python is None:
                self.error = "vLLM's environment is missing or does not import vLLM (see docs/serving.md)"
                return
            self.vllm = VLLMServer(python, decoder, max_model_len=1024, log=self.log_dir / "vllm.log")
            try:
                self.vllm.start()
            except Exception as error:  # noqa: BLE001
                self.error = f"vLLM did not start: {error}"

        self.thread = threading.Thread(target=start, daemon=True)
        self.thread.start()

    def comi_serve(self, vllm_url: str, name: str) -> tuple:
        from server_processes import ServerProcess

        port = _free_port()
        command = console_script("comi-serve") + [
            "--model", self.fx.served_dir, "--vllm-url", vllm_url, "--port", str(port),
            "--max-context-tokens", "400", "--max-request-bytes", "262144", "--log-level", "warning",
            "--max-questions", "4", "--max-sequences", "3", "--max-new-tokens", "64",
        ]  # fmt: skip
        with open(self.log_dir / f"comi-serve-{name}.log", "w") as log:  # the server keeps its own descriptor
            process = ServerProcess(
                command, env={**subprocess_env(), "COMI_SERVE_API_KEY": API_KEY}, stdout=log, stderr=subprocess.STDOUT
            )
        self.processes.append(process)
        return process, f"http://127.0.0.1:{port}"

    def ready(self, catalogue: Catalogue) -> bool:
        if self.thread is not None:
            self.thread.join(timeout=900)
        if self.error or self.vllm is None or not self.vllm.healthy():
            self.error = self.error or "vLLM did not answer"
            return False
        catalogue.server["vllm"] = self.vllm.url
        main, main_url = self.comi_serve(self.vllm.url, "main")
        down, down_url = self.comi_serve(f"http://127.0.0.1:{_free_port()}", "down")
        deadline = time.monotonic() + 300
        for process, url, name in ((main, main_url, "main"), (down, down_url, "down")):
            while time.monotonic() < deadline and process.poll() is None:
                if run_http(url + "/health", "GET", None, {}, 5).code is not None:
                    catalogue.server[name] = url
                    break
                time.sleep(0.5)
        if "main" not in catalogue.server:
            self.error = f"comi-serve did not start (see {self.log_dir / 'comi-serve-main.log'})"
            return False
        return True

    def stop(self) -> None:
        for process in self.processes:
            process.stop(timeout=30)
        if self.vllm is not None:
            self.vllm.stop()

    def server_tracebacks(self) -> int:
        return sum(
            path.read_text(errors="replace").count("Traceback (most recent call last)")
            for path in self.log_dir.glob("comi-serve-*.log")
        )


# --------------------------------------------------------------------------- report
# Paths shown as names that do not change from run to run: {path: name}.
SCRUB: dict[str, str] = {str(REPO): "."}


def scrub(text: str) -> str:
    for path, name in SCRUB.items():
        text = text.replace(path, name)
    return text


def record(case: Case, raw: Raw, outcome: Outcome) -> dict:
    entry = {
        "id": case.id,
        "surface": case.surface,
        "sends": scrub(case.sends),
        "expected": case.expect.describe(),
        "outcome": outcome.outcome,
        "code": outcome.code,
        "error": outcome.error,
        "field": outcome.field,
        "message": scrub(outcome.message),
        "seconds": round(raw.seconds, 2),
    }
    if outcome.note:
        entry["note"] = scrub(outcome.note)
    return entry


def count_table(entries: list[dict]) -> str:
    counts = Counter((entry["surface"], entry["outcome"]) for entry in entries)
    surfaces = [surface for surface in SURFACES if any(entry["surface"] == surface for entry in entries)]
    lines = [
        "| surface | cases | " + " | ".join(OUTCOMES) + " |",
        "| --- | --- | " + " | ".join("---" for _ in OUTCOMES) + " |",
    ]
    for surface in [*surfaces, None]:
        chosen = [entry for entry in entries if surface is None or entry["surface"] == surface]
        cells = [str(sum(counts[(s, o)] for s in ([surface] if surface else surfaces))) for o in OUTCOMES]
        name = surface or "**all**"
        lines.append(f"| {name} | {len(chosen)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def defects(entries: list[dict]) -> list[dict]:
    return [entry for entry in entries if entry["outcome"] not in ("clear", "answered")]


def defect_lines(entries: list[dict]) -> list[str]:
    lines = []
    for entry in defects(entries):
        got = f"{entry['code']}" if entry["code"] is not None else "-"
        if entry.get("error"):
            got += f" {entry['error']}"
        detail = entry.get("note") or ""
        lines.append(
            f"- `{entry['id']}` ({entry['surface']}, **{entry['outcome']}**): sends `{entry['sends'][:160]}`; "
            f"expected {json.dumps(entry['expected'], ensure_ascii=False)}; got {got}: "
            f"{entry['message'][:200]!r}{'; ' + detail if detail else ''}"
        )
    return lines


def markdown(entries: list[dict], command: str, notes: list[str], seconds: float) -> str:
    parts = [
        "# Error catalogue",
        "",
        "Every case sends one bad input or fault (or a valid input that must work) to one surface of comi_hf "
        "and classifies what came back (research/error_catalogue.py says how). Made with:",
        "",
        "```",
        command,
        "```",
        "",
        f"{len(entries)} cases in {seconds / 60:.1f} minutes (torch {torch.__version__}, "
        f"{'with CUDA' if torch.cuda.is_available() else 'no CUDA'}).",
        "",
        count_table(entries),
        "",
    ]
    if notes:
        parts += [*[f"- {note}" for note in notes], ""]
    found = defect_lines(entries)
    parts += [f"## Cases that are neither clear nor answered ({len(found)})", ""]
    parts += found or ["None."]
    parts.append("")
    return "\n".join(parts)


# --------------------------------------------------------------------------- main
def build(cat: Catalogue) -> None:
    qa_cases(cat)
    convert_cases(cat)
    synth_cases(cat)
    export_cases(cat)
    serve_cases(cat)
    generate_cases(cat)
    pipeline_cases(cat)
    client_cases(cat)
    http_cases(cat)


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser(CatalogueArguments, description=__doc__.split("\n\n")[0])
    (args,) = parse_script_arguments(parser, argv)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="comi-catalogue-"))
    SCRUB[str(work)] = "$WORK"  # before the repository: the work folder is not inside it
    SCRUB[str(REPO)] = SCRUB.pop(str(REPO))
    fx = Fixtures(work)
    cat = Catalogue(fx, args.case_timeout)
    build(cat)
    cases = [case for case in cat.cases if not args.quick or case.quick]
    if args.no_server:
        cases = [case for case in cases if not case.server]
    if args.only:
        cases = [case for case in cases if args.only in case.id]
    notes = []
    servers = None
    if any(case.server for case in cases):
        servers = Servers(fx, work)
        servers.start_vllm()
    entries = []
    try:
        ordered = [case for case in cases if not case.server] + [case for case in cases if case.server]
        for number, case in enumerate(ordered, 1):
            if case.server and servers is not None and "ready" not in cat.server:
                cat.server["ready"] = servers.ready(cat)
                if not cat.server["ready"]:
                    notes.append(f"the server cases did not run: {servers.error}")
                    print(notes[-1], flush=True)
            if case.server and not cat.server.get("ready"):
                continue
            raw = case.run()
            outcome = classify(case, raw)
            entries.append(record(case, raw, outcome))
            mark = "" if outcome.outcome in ("clear", "answered") else "   <--"
            print(f"[{number}/{len(ordered)}] {case.id}: {outcome.outcome} ({raw.seconds:.1f} s){mark}", flush=True)
    finally:
        if servers is not None:
            if cat.server.get("ready"):
                logged = servers.server_tracebacks()
                notes.append(f"comi-serve's own logs hold {logged} traceback(s) over the HTTP cases")
            servers.stop()
        for holder in fx._made.get("held sockets", []):
            holder.close()
        shutil.rmtree(work, ignore_errors=True)
    seconds = time.monotonic() - started
    command = "python research/error_catalogue.py " + " ".join(argv if argv is not None else sys.argv[1:])
    summary = {
        "command": command,
        "seconds": round(seconds, 1),
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "counts": {
            surface: dict(Counter(entry["outcome"] for entry in entries if entry["surface"] == surface))
            for surface in SURFACES
        },
        "total": dict(Counter(entry["outcome"] for entry in entries)),
        "notes": notes,
        "cases": entries,
    }
    (output / "catalogue.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    (output / "catalogue.md").write_text(markdown(entries, command, notes, seconds))
    print()
    print(count_table(entries))
    for note in notes:
        print(note)
    found = defect_lines(entries)
    print(f"\n{len(found)} case(s) neither clear nor answered:")
    for line in found:
        print(line)
    return summary


if __name__ == "__main__":
    main()
