import json
import os
import subprocess
import sys


def test_finetune_command_trains_and_saves(tmp_path):
    out = tmp_path / "adapter"
    proc = subprocess.run(
        [sys.executable, "-m", "peft_fast.cli", "finetune", "--steps", "30", "--out", str(out)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    losses = [float(line.split()[-1]) for line in proc.stdout.splitlines() if line.startswith("step")]
    assert len(losses) >= 3 and losses[-1] < losses[0] - 0.3
    assert sorted(os.listdir(out)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
