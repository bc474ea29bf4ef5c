"""The Hub remote-code entry points: one source of truth, flat imports, loading without the package."""

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import PACKAGE, REMOTE_CODE_FILES, random_batch, tiny_comi
from transformers.dynamic_module_utils import get_imports

REPO = Path(__file__).resolve().parents[1]
# What loading remote code may import: the standard library and what transformers itself needs.
REMOTE_CODE_DEPENDENCIES = {"torch", "transformers", "huggingface_hub"}


def test_top_level_entry_points_are_the_package_files():
    assert {path.name for path in REPO.glob("*.py")} == set(REMOTE_CODE_FILES)
    for name in REMOTE_CODE_FILES:
        entry = REPO / name
        assert entry.is_symlink(), f"{name} must link to the package's file, not copy it"
        assert entry.resolve() == (PACKAGE / name).resolve()


def test_remote_code_needs_no_package_beyond_torch_and_transformers():
    # transformers refuses remote code whose imports outside `try` are not installed (on the Hub it
    # checks every file; in a local directory only the model file).
    for name in REMOTE_CODE_FILES:
        extra = set(get_imports(PACKAGE / name)) - REMOTE_CODE_DEPENDENCIES - set(sys.stdlib_module_names)
        assert not extra, f"{name} needs {sorted(extra)} to load with trust_remote_code"


def test_remote_code_files_import_each_other_only_as_flat_relative_modules():
    for name in REMOTE_CODE_FILES:
        tree = ast.parse((PACKAGE / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1 and node.module, f"{name}: only `from .module import name` is followed"
                assert f"{node.module}.py" in REMOTE_CODE_FILES, f"{name} imports .{node.module}, not shipped"
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module]
                assert not any(m.split(".")[0] == "comi_hf" for m in modules), f"{name} imports the package"


def test_saved_directory_carries_code_and_auto_map(tmp_path):
    tiny_comi().save_pretrained(tmp_path)
    for name in REMOTE_CODE_FILES:
        assert (tmp_path / name).read_text() == (PACKAGE / name).read_text()
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_comi.COMIConfig",
        "AutoModel": "modeling_comi.COMIForConditionalGeneration",
        "AutoModelForCausalLM": "modeling_comi.COMIForConditionalGeneration",
    }


_FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys
    sys.modules["comi_hf"] = None  # the package must not be needed
    sys.modules["deepspeed"] = None  # nor DeepSpeed, which only the test extra installs
    try:
        import comi_hf
    except ImportError:
        pass
    else:
        raise SystemExit("comi_hf is importable")
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    directory, batch_file = sys.argv[1], sys.argv[2]
    batch = torch.load(batch_file)
    config = AutoConfig.from_pretrained(directory, trust_remote_code=True)
    results = {"config": type(config).__name__, "merge_size": config.merge_size}
    for name, auto in (("AutoModel", AutoModel), ("AutoModelForCausalLM", AutoModelForCausalLM)):
        model = auto.from_pretrained(directory, trust_remote_code=True).eval()
        results[name] = model.generate(*batch).tolist()
    tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=True)
    results["text"] = model.generate(
        context="the code of red river is 4821 .", query="what is the code of red river ?", tokenizer=tokenizer
    ).tolist()
    from transformers import pipeline
    inferred = pipeline(model=directory, trust_remote_code=True)
    named = pipeline("comi-qa", model=directory, trust_remote_code=True)
    results["pipeline_class"] = type(inferred).__name__
    results["pipeline"] = [
        p(context="the code of red river is 4821 .", questions=["what is the code of red river ?", "which city ?"])
        for p in (inferred, named)
    ]
    print(json.dumps(results))
    """
)


@pytest.mark.slow
def test_fresh_process_without_the_package_loads_and_generates_the_same(tmp_path, tokenizer):
    model = tiny_comi()
    directory = tmp_path / "model"
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    batch = random_batch()
    torch.save(batch, tmp_path / "batch.pt")
    script = tmp_path / "load.py"
    script.write_text(_FRESH_PROCESS)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    done = subprocess.run(
        [sys.executable, "-P", str(script), str(directory), str(tmp_path / "batch.pt")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert results["config"] == "COMIConfig" and results["merge_size"] == 4
    expected = model.generate(*batch).tolist()
    assert results["AutoModel"] == expected
    assert results["AutoModelForCausalLM"] == expected
    text = model.generate(
        context="the code of red river is 4821 .", query="what is the code of red river ?", tokenizer=tokenizer
    )
    assert results["text"] == text.tolist()
    from transformers import pipeline

    expected_pipeline = pipeline("comi-qa", model=model, tokenizer=tokenizer)(
        context="the code of red river is 4821 .", questions=["what is the code of red river ?", "which city ?"]
    )
    assert results["pipeline_class"] == "COMIQuestionAnsweringPipeline"
    assert results["pipeline"] == [expected_pipeline, expected_pipeline]
