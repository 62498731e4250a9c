"""Adapter saves are all-or-nothing per folder (peft_fast/utils/atomic_save.py): a save that fails or is killed at
any point leaves the old adapter or the new one, whole, and loading afterwards gives exactly one of them."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peft_fast as pf
from peft_fast.utils import atomic_save

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# marker v: lora_alpha = v and every adapter weight = v, so a folder mixing two saves is caught
MAKE = """
import torch, peft_fast as pf
from torch import nn

def adapter(v, r=4):
    torch.manual_seed(0)
    model = pf.get_peft_model(nn.Sequential(nn.Linear(16, 16)), pf.LoraConfig(r=r, lora_alpha=v, target_modules=["0"]))
    model.add_adapter("other", pf.LoraConfig(r=r, lora_alpha=v, target_modules=["0"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.fill_(v)
    return model
"""
exec(MAKE)  # noqa: S102 - the same helper in this process and in the children


def read_marker(folder):
    """The marker of the adapter in `folder` after loading it the way users do; fails on a mixed folder."""
    config = pf.PeftConfig.from_pretrained(folder)  # (undoes an interrupted save first)
    weights = load_file(os.path.join(folder, "adapter_model.safetensors"))
    values = {float(v.unique().item()) for v in weights.values()}
    assert values == {float(config.lora_alpha)}, f"{folder} mixes two saves: config {config.lora_alpha}, weights {values}"
    model = pf.PeftModel.from_pretrained(nn.Sequential(nn.Linear(16, 16)), folder)
    assert model.base_model.model[0].lora_A["default"].weight.eq(config.lora_alpha).all()
    return config.lora_alpha


def leftovers(folder):
    found = []
    for dirpath, dirnames, filenames in os.walk(os.path.dirname(folder)):
        found += [n for n in filenames + dirnames if ".peft_fast-" in n]
    return found


def test_a_save_writes_what_peft_writes(tmp_path):
    adapter(3).save_pretrained(tmp_path / "a")
    assert sorted(os.listdir(tmp_path / "a")) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                                  "other"]
    assert read_marker(tmp_path / "a") == 3 and read_marker(tmp_path / "a" / "other") == 3
    adapter(5).save_pretrained(tmp_path / "a")  # over an existing save
    assert read_marker(tmp_path / "a") == 5 and read_marker(tmp_path / "a" / "other") == 5
    assert leftovers(tmp_path / "a") == []


@pytest.mark.parametrize("fail_at", [1, 2, 3, 4])
def test_a_failing_rename_leaves_the_old_adapter(tmp_path, monkeypatch, fail_at):
    folder = tmp_path / "a"
    adapter(1).save_pretrained(folder)
    calls = []
    real = os.replace

    def flaky(src, dst):
        calls.append(dst)
        if len(calls) == fail_at:
            raise OSError(28, "No space left on device (simulated)")
        return real(src, dst)

    monkeypatch.setattr(atomic_save.os, "replace", flaky)
    with pytest.raises(OSError, match="simulated"):
        adapter(2).save_pretrained(folder)
    monkeypatch.setattr(atomic_save.os, "replace", real)
    # the root (3 files) is written first: a failure there stops the save; at the 4th rename "other" fails
    assert (read_marker(folder), read_marker(folder / "other")) == ((1, 1) if fail_at <= 3 else (2, 1))
    assert leftovers(folder) == []


def test_a_failing_weights_write_leaves_the_old_adapter_and_no_new_folder(tmp_path, monkeypatch):
    import safetensors.torch

    adapter(1).save_pretrained(tmp_path / "a")

    def disk_full(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"\0" * 100)  # a partial file, then the error
        raise OSError(28, "No space left on device (simulated)")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    for folder in (tmp_path / "a", tmp_path / "fresh"):
        with pytest.raises(OSError, match="simulated"):
            adapter(2).save_pretrained(folder)
    monkeypatch.undo()
    assert read_marker(tmp_path / "a") == 1 and read_marker(tmp_path / "a" / "other") == 1
    assert not (tmp_path / "fresh").exists()
    assert leftovers(tmp_path / "a") == [] and not [p for p in os.listdir(tmp_path) if ".peft_fast-" in p]


def _child(tmp_path, body):
    script = tmp_path / "child.py"
    script.write_text(MAKE + textwrap.dedent(body))
    return subprocess.run([sys.executable, str(script), str(tmp_path / "a")], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


@pytest.mark.parametrize("kill_at", [1, 2, 3, 5])
def test_a_save_killed_between_renames_loads_as_the_old_adapter(tmp_path, kill_at):
    """SIGKILL at the kill_at-th rename: no Python cleanup runs; the next load undoes the half-done save."""
    proc = _child(tmp_path, f"""
        import os, signal, sys
        from peft_fast.utils import atomic_save
        folder = sys.argv[1]
        adapter(1).save_pretrained(folder)
        real, calls = os.replace, []
        def killing(src, dst):
            calls.append(dst)
            if len(calls) == {kill_at}:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(src, dst)
        atomic_save.os.replace = killing
        adapter(2).save_pretrained(folder)
    """)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert read_marker(tmp_path / "a") in (1, 2) and read_marker(tmp_path / "a" / "other") in (1, 2)
    assert leftovers(tmp_path / "a") == []


def test_a_save_over_the_file_size_limit_leaves_the_old_adapter(tmp_path):
    """RLIMIT_FSIZE: the kernel refuses the big weights file half-way (EFBIG)."""
    pytest.importorskip("resource")
    proc = _child(tmp_path, """
        import resource, signal, sys
        folder = sys.argv[1]
        adapter(1).save_pretrained(folder)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
        try:
            adapter(2, r=256).save_pretrained(folder)  # ~32 KB of weights a folder
        except Exception as exc:  # safetensors' own error type, or OSError
            print("refused:", exc)
    """)
    assert proc.returncode == 0 and "refused" in proc.stdout, proc.stderr[-2000:]
    assert read_marker(tmp_path / "a") == 1 and read_marker(tmp_path / "a" / "other") == 1
    assert leftovers(tmp_path / "a") == []


def test_a_save_killed_at_a_random_moment_never_mixes(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", MAKE + textwrap.dedent("""
        import sys, itertools
        models = [adapter(1), adapter(2)]
        print("ready", flush=True)
        for i in itertools.count():
            models[i % 2].save_pretrained(sys.argv[1])
    """), str(tmp_path / "a")], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout.readline().strip() == "ready"
    import time

    time.sleep(1.5)
    proc.kill()
    proc.wait(timeout=60)
    assert read_marker(tmp_path / "a") in (1, 2) and read_marker(tmp_path / "a" / "other") in (1, 2)
    assert leftovers(tmp_path / "a") == []


def test_an_unreadable_journal_still_rolls_back(tmp_path):
    folder = tmp_path / "a"
    adapter(1).save_pretrained(folder)
    (folder / atomic_save.JOURNAL).write_text("{trunc")
    (folder / ".adapter_config.json.peft_fast-tmp").write_text("{}")
    assert read_marker(folder) == 1
    assert leftovers(folder) == []


def test_config_save_pretrained_is_atomic_too(tmp_path, monkeypatch):
    config = pf.LoraConfig(r=4, lora_alpha=7, target_modules=["0"])
    config.save_pretrained(tmp_path)
    monkeypatch.setattr(atomic_save.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("simulated")))
    with pytest.raises(OSError, match="simulated"):
        pf.LoraConfig(r=4, lora_alpha=9, target_modules=["0"]).save_pretrained(tmp_path)
    monkeypatch.undo()
    assert json.loads((tmp_path / "adapter_config.json").read_text())["lora_alpha"] == 7
    assert [p for p in os.listdir(tmp_path) if ".peft_fast-" in p] == []
