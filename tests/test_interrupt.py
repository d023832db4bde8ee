"""Ctrl-C (SIGINT) and a scheduler's SIGTERM during training stop at the end of an optimizer step with one line
saying where to resume from; a full disk while saving a checkpoint leaves no half-written folder (issue 20)."""

import errno
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import REPO, tiny_train_args, write_prompts
from yoso.training.interrupt import Interrupted, StopRequest, interrupt_message

MESSAGE = re.compile(r"^train_yoso_lora\.py: interrupted at step (\d+); the last checkpoint is (\S*checkpoint-(\d+)); "
                     r"resume with --resume_from_checkpoint latest$")


def test_stop_request_records_the_first_signal_and_raises_on_the_second():
    before = signal.getsignal(signal.SIGINT)  # a test runner's worker may ignore SIGINT: whatever it was comes back
    with StopRequest() as stop:
        stop.defer, stop.step = True, 7
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM  # recorded, the program goes on

        class OneProcess:
            num_processes = 1

        assert stop.requested(OneProcess()) == signal.SIGTERM
        with pytest.raises(Interrupted) as second:
            os.kill(os.getpid(), signal.SIGINT)
        assert second.value.step == 7 and second.value.exit_code == 130
    with StopRequest() as stop:  # not deferred (models loading): at once
        with pytest.raises(Interrupted) as first:
            os.kill(os.getpid(), signal.SIGTERM)
        assert first.value.step is None and first.value.exit_code == 143
    assert signal.getsignal(signal.SIGINT) is before  # restored


def test_interrupt_messages():
    assert interrupt_message(5, Path("out/checkpoint-4")) == (
        "interrupted at step 5; the last checkpoint is out/checkpoint-4; resume with --resume_from_checkpoint latest")
    assert interrupt_message(3, None).startswith("interrupted at step 3; nothing was saved")
    assert interrupt_message(None, None).startswith("interrupted before training started; nothing was saved")


def start_training(args):
    env = dict(os.environ, ACCELERATE_USE_CPU="true", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    # A child inherits an ignored SIGINT (a test runner's worker may ignore it): restore the default, as a terminal has.
    return subprocess.Popen([sys.executable, str(REPO / "train_yoso_lora.py"), *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for(path, process, timeout=400):
    deadline = time.monotonic() + timeout
    while not path.is_dir():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.2)


def leftovers(output_dir):
    return [p for p in output_dir.rglob("*") if p.name.endswith(".incomplete") or ".tmp" in p.name]


@pytest.mark.parametrize("signum,code,on_interrupt", [(signal.SIGINT, 130, False), (signal.SIGTERM, 143, True)])
def test_a_signal_stops_at_a_step_end_with_one_line(tiny_base, tiny_teacher, tmp_path, signum, code, on_interrupt):
    output_dir = tmp_path / "out"
    args = tiny_train_args(tiny_base, tiny_teacher, write_prompts(tmp_path / "p.jsonl"), output_dir, steps=100000,
                           checkpointing_steps=2, report_to="none")
    if on_interrupt:
        args.append("--checkpoint_on_interrupt")
    process = start_training(args)
    wait_for(output_dir / "checkpoint-2", process)
    process.send_signal(signum)
    out, err = process.communicate(timeout=300)
    lines = [line for line in err.splitlines() if line.strip()]
    assert process.returncode == code, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    match = MESSAGE.match(lines[-1])
    assert match, lines[-3:]
    step, checkpoint, saved = int(match.group(1)), Path(match.group(2)), int(match.group(3))
    assert step >= 2 and Path(checkpoint).is_dir() and checkpoint.parent == output_dir
    if on_interrupt:
        assert saved == step  # saved where it stopped
    else:
        assert saved == step - step % 2  # the last regular checkpoint
    assert (checkpoint / "pytorch_lora_weights.safetensors").is_file()
    assert not (output_dir / "pytorch_lora_weights.safetensors").exists()  # no final outputs of a stopped run
    assert leftovers(output_dir) == []
    if on_interrupt:  # the saved state resumes
        resumed = subprocess.run([sys.executable, str(REPO / "train_yoso_lora.py"), *map(str, tiny_train_args(
            tiny_base, tiny_teacher, tmp_path / "p.jsonl", output_dir, steps=step + 1, checkpointing_steps=1000,
            report_to="none", resume_from_checkpoint="latest"))], cwd=REPO, capture_output=True, text=True, timeout=600,
            env=dict(os.environ, ACCELERATE_USE_CPU="true", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert f"resuming from {checkpoint}" in resumed.stderr
        assert (output_dir / "pytorch_lora_weights.safetensors").is_file()


# ---- a full disk ------------------------------------------------------------------------------------


class FakeAccelerator:
    is_main_process = True

    def __init__(self, fail_on):
        self.fail_on = fail_on

    def save_state(self, folder):
        Path(folder).mkdir(parents=True)
        (Path(folder) / "optimizer.bin").write_bytes(b"x" * 100)
        if folder.endswith(f"checkpoint-{self.fail_on}.incomplete"):
            raise OSError(errno.ENOSPC, "No space left on device", str(Path(folder) / "discriminator.safetensors"))
        (Path(folder) / "pytorch_lora_weights.safetensors").write_bytes(b"y")

    def wait_for_everyone(self):
        pass


class NoLog:
    def info(self, *a, **k):
        pass


def test_a_full_disk_removes_the_unfinished_checkpoint_and_keeps_the_others(tmp_path):
    from yoso.training.checkpoint import list_checkpoints, save_checkpoint
    from yoso.training.interrupt import DiskFullError

    accelerator = FakeAccelerator(fail_on=6)
    for step in (2, 4):
        save_checkpoint(accelerator, tmp_path, step, None, NoLog())
    with pytest.raises(DiskFullError) as error:
        save_checkpoint(accelerator, tmp_path, 6, None, NoLog())
    assert [step for step, _ in list_checkpoints(tmp_path)] == [2, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert all((tmp_path / f"checkpoint-{s}" / "pytorch_lora_weights.safetensors").read_bytes() == b"y" for s in (2, 4))
    text = str(error.value)
    assert str(tmp_path / "checkpoint-6") in text and re.search(r"\(\d+(\.\d)? (bytes|KB|MB|GB) free there\)", text)
    assert "\n" not in text


def test_a_full_disk_during_training_is_one_line_and_exit_1(tiny_base, tiny_teacher, tmp_path, capsys, monkeypatch):
    """The real run, in this process, with safetensors' writer made to fail like a full disk in checkpoint-4."""
    import safetensors.torch
    from accelerate.state import AcceleratorState, GradientState, PartialState

    import train_yoso_lora

    real_save_file = safetensors.torch.save_file

    def save_file(tensors, filename, *a, **k):
        if "checkpoint-4.incomplete" in str(filename):
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))
        return real_save_file(tensors, filename, *a, **k)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    output_dir = tmp_path / "out"
    args = tiny_train_args(tiny_base, tiny_teacher, write_prompts(tmp_path / "p.jsonl"), output_dir, steps=6,
                           checkpointing_steps=2, report_to="none")
    for state in (AcceleratorState, GradientState, PartialState):
        state._reset_state()
    try:
        with pytest.raises(SystemExit) as exit_info:
            train_yoso_lora.main([str(a) for a in args])
    finally:
        for state in (AcceleratorState, GradientState, PartialState):
            state._reset_state()
    assert exit_info.value.code == 1
    err_lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err_lines) == 1, err_lines
    assert err_lines[0].startswith("train_yoso_lora.py: error: no space left on the device while writing "
                                   f"{output_dir / 'checkpoint-4'} (")
    assert sorted(p.name for p in output_dir.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-2"]
    assert leftovers(output_dir) == []


def test_two_processes_stop_together_under_accelerate_launch(tiny_base, tiny_teacher, tmp_path):
    """Ctrl-C in a terminal signals the launcher and both workers (one process group): the workers agree on the
    step, rank 0 prints the one line, nothing is half-written. The launcher (torch elastic) then prints its own
    SignalException traceback and exits 1: no traceback comes from train_yoso_lora.py."""
    output_dir = tmp_path / "out"
    args = tiny_train_args(tiny_base, tiny_teacher, write_prompts(tmp_path / "p.jsonl"), output_dir, steps=100000,
                           checkpointing_steps=2, report_to="none")
    env = dict(os.environ, ACCELERATE_USE_CPU="true", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(REPO / "train_yoso_lora.py"), *map(str, args)]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    wait_for(output_dir / "checkpoint-2", process)
    os.killpg(process.pid, signal.SIGINT)
    _, err = process.communicate(timeout=300)
    ours = [line for line in err.splitlines() if line.startswith("train_yoso_lora.py:")]
    assert len(ours) == 1, err[-3000:]
    match = MESSAGE.match(ours[0])
    assert match and int(match.group(1)) >= 2 and Path(match.group(2)).is_dir(), ours
    assert "train_yoso_lora.py\", line" not in err, err[-3000:]
    assert process.returncode != 0
    assert leftovers(output_dir) == [] and not (output_dir / "pytorch_lora_weights.safetensors").exists()
