"""examples/train.py under the accelerate configs of examples/accelerate/, on 2 CPU processes (gloo).

Every config trains the README's fine-tuning run (6 steps) and must give DDP's losses and weights.
About 15-25 s a run on 2 CPU cores (the first DeepSpeed run on a machine also builds its shm op).
"""

import importlib.util
import re
import shutil
import sys

import pytest
import torch
from conftest import EXAMPLES, REPO, run_command
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

CONFIGS = EXAMPLES / "accelerate"
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="pip install deepspeed")


def _train(tiny_backbone, output_dir, launch, *extra, check=True):
    accelerate = shutil.which("accelerate")
    assert accelerate
    command = [accelerate, "launch", *launch, "--num_processes", "2", "--num_machines", "1"]
    command += ["--mixed_precision", "no", "--dynamo_backend", "no", str(EXAMPLES / "train.py")]
    command += ["--model_name_or_path", str(tiny_backbone), "--train_file", str(EXAMPLES / "data" / "train.jsonl")]
    command += ["--output_dir", str(output_dir), "--encoder_layers", "2"]
    command += ["--merge_size", "4", "--merge_sizes", "2", "4"]
    command += ["--lora_r", "8", "--lora_alpha", "16", "--learning_rate", "1e-2", "--max_steps", "6"]
    command += ["--per_device_train_batch_size", "4", "--logging_steps", "1", "--save_strategy", "no", *extra]
    done = run_command(command, output_dir.parent, check=check)
    # The main process prints the trainer's logs: each step's loss, to 4 significant digits.
    return done, re.findall(r"'loss': '([0-9.]+)'", done.stdout + done.stderr)


@pytest.fixture(scope="module")
def ddp(tiny_backbone, tmp_path_factory):
    output = tmp_path_factory.mktemp("ddp") / "comi"
    _, losses = _train(tiny_backbone, output, ["--multi_gpu"], "--use_cpu")
    assert len(losses) == 6
    return losses, load_file(output / "model.safetensors")


def test_ddp_losses_are_the_ones_docs_training_states(ddp):
    row = re.search(r"^\| DDP \(`--multi_gpu`\) \| ([0-9. ]+) \|", (REPO / "docs" / "training.md").read_text(), re.M)
    assert row, "docs/training.md has no DDP row"
    # Printed to 4 significant digits; another CPU may round the last one differently.
    assert [float(loss) for loss in row.group(1).split()] == pytest.approx([float(loss) for loss in ddp[0]], abs=2e-3)


@needs_deepspeed
@pytest.mark.parametrize(
    ("config", "atol"),
    [
        ("deepspeed_zero2.yaml", 1e-6),  # measured 2.0e-7 (the clipping norm, summed differently)
        # ZeRO-3's per-module autograd hooks change how gradient contributions are summed (1 ulp);
        # Adam (eps 1e-8) turns that into up to 1.1e-4 on weights whose gradient is near 0.
        ("deepspeed_zero3.yaml", 1e-3),
    ],
)
def test_deepspeed_matches_ddp(tiny_backbone, ddp, tmp_path, config, atol):
    output = tmp_path / "comi"
    _, losses = _train(tiny_backbone, output, ["--config_file", str(CONFIGS / config)], "--use_cpu")
    assert losses == ddp[0]
    # ZeRO-3 too writes a merged COMI model (gathered, then merged in the main process).
    assert not (output / "adapter").exists()
    weights = load_file(output / "model.safetensors")
    assert weights.keys() == ddp[1].keys()
    for name, tensor in weights.items():
        torch.testing.assert_close(tensor, ddp[1][name], rtol=0, atol=atol, msg=name)
    check = f"from transformers import AutoModel; AutoModel.from_pretrained({str(output)!r}, trust_remote_code=True)"
    run_command([sys.executable, "-c", check], tmp_path)


def test_fsdp_config_on_cpus_trains_with_ddp_and_says_so(tiny_backbone, ddp, tmp_path):
    # accelerate (state.py) enables FSDP only for GPU-like devices: on CPUs the config runs DDP.
    done, losses = _train(tiny_backbone, tmp_path / "comi", ["--config_file", str(CONFIGS / "fsdp.yaml")], "--use_cpu")
    assert "accelerate does not run on CPUs: training with DDP" in done.stderr
    assert losses == ddp[0]
    weights = load_file(tmp_path / "comi" / "model.safetensors")
    assert all(torch.equal(tensor, ddp[1][name]) for name, tensor in weights.items())


@pytest.mark.skipif(torch.cuda.is_available(), reason="without --use_cpu the run uses the GPUs")
def test_several_processes_without_a_gpu_need_use_cpu(tiny_backbone, tmp_path):
    done, _ = _train(tiny_backbone, tmp_path / "comi", ["--multi_gpu"], check=False)
    assert done.returncode != 0
    assert "no GPU was found; add --use_cpu" in done.stderr
