"""peft_fast under torch DDP on the CPU (gloo), launched with torchrun as users launch it (scripts/ddp_lora.py): two
ranks train what one process trains, write the same adapter files, and a rank that raises stops the job instead of
hanging it. The NCCL / multi-GPU runs of the same script need a machine with several GPUs."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "ddp_lora.py")

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")


def _run_job(cmd: list, timeout: float) -> subprocess.CompletedProcess:
    """Run a torchrun job in its own process group; past `timeout` the whole group is killed (torchrun's ranks too,
    which would otherwise outlive the test) and the test fails with the job's output."""
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the torchrun job ran over {timeout} s and was killed; its output ends:\n{out[-2000:]}\n"
                    f"{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _torchrun(nproc: int, out, *extra, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", SCRIPT,
           "--device", "cpu", "--backend", "gloo", "--out", str(out), *extra]
    return _run_job(cmd, timeout)


ENGINES = {"ddp": [], "fsdp2": ["--fsdp"],
           # activation checkpointing and torch.compile of each decoder layer (dynamo + AOT autograd; inductor's C++
           # builds would take minutes on a CI CPU) under DDP
           "ddp+checkpointing+compile": ["--checkpointing", "--compile", "aot_eager"],
           "fsdp2+checkpointing+compile": ["--fsdp", "--checkpointing", "--compile", "aot_eager"]}


@pytest.mark.parametrize("engine", list(ENGINES))
def test_two_ranks_train_what_one_process_trains_and_save_the_same_adapter(tmp_path, engine):
    runs = {}
    for nproc in (1, 2):
        done = _torchrun(nproc, tmp_path / f"n{nproc}", *ENGINES[engine])
        written = (tmp_path / f"n{nproc}" / "losses.json").exists()  # (a failure after the work, or during it)
        assert done.returncode == 0, f"losses.json written: {written}\n{done.stderr[-3000:]}"
        runs[nproc] = json.load(open(tmp_path / f"n{nproc}" / "losses.json"))
    assert runs[2]["world_size"] == 2 and runs[1]["world_size"] == 1
    assert len(set(runs[1]["losses"])) == len(runs[1]["losses"])  # it trained: the loss moves every step
    if engine.startswith("fsdp2"):  # and the files load back into a sharded model (set_peft_model_state_dict shards them)
        assert runs[2]["fsdp_reload_matches"] is True and runs[1]["fsdp_reload_matches"] is True
    torch.testing.assert_close(torch.tensor(runs[2]["losses"]), torch.tensor(runs[1]["losses"]), rtol=1e-5, atol=1e-6)
    folders = [tmp_path / f"n{nproc}" / "adapter" for nproc in (1, 2)]
    assert sorted(os.listdir(folders[0])) == sorted(os.listdir(folders[1]))
    one, two = (load_file(str(f / "adapter_model.safetensors")) for f in folders)
    assert sorted(one) == sorted(two) and len(one) > 0
    for key in one:  # the adapters moved (AdamW steps) and moved the same way
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-6, msg=key)
    assert json.load(open(folders[0] / "adapter_config.json")) == json.load(open(folders[1] / "adapter_config.json"))


def test_a_rank_that_raises_stops_the_job_instead_of_hanging_it(tmp_path):
    start = time.monotonic()
    done = _torchrun(2, tmp_path, "--fail-rank", "1", "--timeout-s", "60", timeout=240)
    assert done.returncode != 0
    assert "deliberate failure on rank 1" in done.stderr + done.stdout
    assert time.monotonic() - start < 200
    assert not (tmp_path / "losses.json").exists()


def test_trainer_under_ddp_checkpoints_the_adapter_once(tmp_path):
    """transformers' Trainer run by torchrun on two gloo ranks: rank 0 alone writes each checkpoint, as adapter files
    (peft_fast/trainer_support.py), and they load."""
    import peft_fast as pf
    from transformers import LlamaConfig, LlamaForCausalLM

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "tests", "ddp_trainer_child.py"), str(tmp_path)]
    done = _run_job(cmd, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    for folder in ("checkpoint-2", "checkpoint-4", "final"):
        files = os.listdir(tmp_path / folder)
        assert "adapter_config.json" in files and "adapter_model.safetensors" in files, (folder, files)
        assert "model.safetensors" not in files, (folder, files)
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))
    loaded = pf.PeftModel.from_pretrained(base, str(tmp_path / "final"))
    saved = load_file(str(tmp_path / "final" / "adapter_model.safetensors"))
    state = pf.get_peft_model_state_dict(loaded)
    assert sorted(saved) == sorted(state) and all(torch.equal(saved[k], state[k]) for k in saved)
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)  # trained: B moved off zero
