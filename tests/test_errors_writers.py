"""Every writer of a named output owns it while it writes: a second writer of the same name fails at
once, naming the process, and the file is wholly the first's. A full disk or a read-only folder is a
named error with the previous version byte-identical and no temporary left behind. A process killed
between write_atomically's two renames leaves the previous version aside, and readers put it back.

Full disks and read-only folders are real where this machine lets a test mount a tmpfs (root, or
CAP_SYS_ADMIN); the same errors are also raised by monkeypatched calls, which run everywhere."""

import builtins
import contextlib
import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import Tok, examples, lora_model
from minilora.errors import CheckpointError, WriteError
from minilora.formats.atomic import owning, recover, write_atomically, write_file
from minilora.loading.weights import load_model, save_model
from minilora.lora.peft_files import load_adapter, read_adapter, save_adapter
from minilora.ship.gguf_export import export_adapter, export_merged
from minilora.training.checkpoint import checkpoint_folders, own_output_dir
from minilora.training.loop import TrainConfig, train
from minilora.training.plots import loss_svg, plot_at_end, plot_run, read_metrics

TESTS = os.path.dirname(__file__)
ROOT = os.path.dirname(TESTS)


def snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder under `folder`, hidden ones included, with the files' digests."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*")) if p.name != ".fill" and not p.name.startswith(".fill-")}


def metrics(run: Path, steps: int, scale: float = 1.0) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "loss": scale / i, "lr": 1e-3}) + "\n"
                                               for i in range(1, steps + 1)))


def child(code: str, *args: str, env: dict | None = None) -> subprocess.Popen:
    """A second Python process running `code` (with the tests' helpers importable), its stdout a pipe."""
    prelude = f"import os, sys; sys.path[:0] = [{TESTS!r}, {ROOT!r}]\n"
    return subprocess.Popen([sys.executable, "-c", prelude + textwrap.dedent(code), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)


def wait_for(proc: subprocess.Popen, word: str) -> None:
    line = proc.stdout.readline().strip()
    if line != word:
        proc.kill()
        raise AssertionError(f"child said {line!r}, not {word!r}: {proc.stderr.read()[-3000:]}")


def finish(proc: subprocess.Popen) -> None:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ---------------------------------------------------------------------------------------------
# 1. Two writers, one name: the second fails at once by name; the output is wholly the first's

SLOW_GGUF = """
    import time
    from conftest import lora_model
    import minilora.ship.gguf_export as export
    real, said = export.encode, []
    def slow(t, kind):
        if not said:
            print("writing", flush=True)
            said.append(1)
        time.sleep(0.1)  # a big model: minutes of tensors
        return real(t, kind)
    export.encode = slow
    model = lora_model({"llama-gqa": (None, sys.argv[1])})
    export.export_merged(model, sys.argv[2], "f16")
"""


def test_two_gguf_exports_to_one_name_never_mix(saved_tiny, tmp_path):
    target = tmp_path / "m.gguf"
    first = child(SLOW_GGUF, str(saved_tiny["llama-gqa"][1]), str(target))
    try:
        wait_for(first, "writing")
        start = time.monotonic()
        with pytest.raises(WriteError, match=rf"m\.gguf: another process \(pid {first.pid}\) is writing it now; "
                                             r"nothing was written\. Wait for it to finish, or use another name"):
            export_merged(lora_model(saved_tiny), target, "q8_0")
        assert time.monotonic() - start < 5  # at once, not after the first one
        with pytest.raises(WriteError, match=rf"pid {first.pid}"):
            export_adapter(lora_model(saved_tiny), target)
        assert first.poll() is None  # the first was still writing all along
    finally:
        finish(first)
    export_merged(lora_model(saved_tiny), tmp_path / "alone.gguf", "f16")  # the first's, written with no rival
    assert target.read_bytes() == (tmp_path / "alone.gguf").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alone.gguf", "m.gguf"]  # no temporary, no lock left


SLOW_ADAPTER = """
    import time
    from conftest import lora_model
    import minilora.lora.peft_files as files
    real = files.save
    def slow(*a, **k):
        print("writing", flush=True)
        time.sleep(2)
        return real(*a, **k)
    files.save = slow
    files.save_adapter(lora_model({"llama-gqa": (None, sys.argv[1])}), sys.argv[2])
"""


@pytest.mark.parametrize("second", ["save_adapter", "save_model", "write_atomically"])
def test_two_folder_writers_to_one_name_never_mix(saved_tiny, tmp_path, second):
    target = tmp_path / "adapter"
    first = child(SLOW_ADAPTER, str(saved_tiny["llama-gqa"][1]), str(target))
    other = lora_model(saved_tiny, std=0.3)  # a different adapter
    try:
        wait_for(first, "writing")
        with pytest.raises(WriteError, match=rf"adapter: another process \(pid {first.pid}\) is writing it now"):
            if second == "save_adapter":
                save_adapter(other, target)
            elif second == "save_model":
                save_model(load_model(saved_tiny["llama-gqa"][1]), target)
            else:  # what save_checkpoint calls
                write_atomically(target, lambda d: (d / "trainer_state.json").write_text("{}"))
    finally:
        finish(first)
    save_adapter(lora_model(saved_tiny), tmp_path / "alone")
    assert snapshot(target) == snapshot(tmp_path / "alone")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "alone"]


SLOW_PLOT = """
    import os, time
    real = os.fsync
    def slow(fd):
        print("writing", flush=True)
        time.sleep(2)
        real(fd)
    os.fsync = slow
    from minilora.training.plots import plot_run
    plot_run(sys.argv[1])
"""


def test_two_plots_of_one_run_never_mix(tmp_path):
    run = tmp_path / "run"
    metrics(run, 30)
    expected = loss_svg(read_metrics(run / "metrics.jsonl")).encode()
    first = child(SLOW_PLOT, str(run))
    try:
        wait_for(first, "writing")
        metrics(run, 60, scale=5.0)  # the second plot would draw another curve
        with pytest.raises(WriteError, match=rf"loss\.svg: another process \(pid {first.pid}\) is writing it now"):
            plot_run(run)
    finally:
        finish(first)
    assert (run / "loss.svg").read_bytes() == expected
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]


FAKE_HUB = """
    import json, os, time
    import huggingface_hub
    class FakeApi:
        def create_repo(self, *a, **k): pass
        def create_commit(self, repo_id, operations, commit_message=None):
            print("pushing", flush=True)
            time.sleep(float(os.environ.get("PUSH_SECONDS", "0")))
            sent = {}
            for op in operations:
                data = op.path_or_fileobj
                sent[op.path_in_repo] = open(data, "rb").read().hex() if isinstance(data, str) else data.hex()
            print(json.dumps(sent), flush=True)
            class Info: commit_url = "https://hub/commit/1"
            return Info()
    huggingface_hub.HfApi = FakeApi
"""


def test_a_push_holds_its_folder_against_writers(saved_tiny, tmp_path, monkeypatch):
    folder = tmp_path / "adapter"
    save_adapter(lora_model(saved_tiny), folder)
    before = snapshot(folder)
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    pusher = child(textwrap.dedent(FAKE_HUB) + "from minilora.ship.hub import push_to_hub\npush_to_hub(sys.argv[1], 'me/x')\n",
                   str(folder), env={**env, "HF_TOKEN": "hf_test", "PUSH_SECONDS": "3"})
    try:
        wait_for(pusher, "pushing")
        with pytest.raises(WriteError, match=rf"adapter: another process \(pid {pusher.pid}\) is pushing it to the "
                                             r"Hub now; nothing was written"):
            save_adapter(lora_model(saved_tiny, std=0.3), folder)
        sent = json.loads(pusher.stdout.readline())
    finally:
        finish(pusher)
    assert snapshot(folder) == before
    for name in ("adapter_model.safetensors", "adapter_config.json"):  # sent as they were: no mixture
        assert bytes.fromhex(sent[name]) == (folder / name).read_bytes()
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    # and a push while a save is writing the folder fails by name, sending nothing
    writer = child(SLOW_ADAPTER, str(saved_tiny["llama-gqa"][1]), str(folder))
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: pytest.fail("nothing may be sent"))
    from minilora.ship.hub import push_to_hub
    try:
        wait_for(writer, "writing")
        with pytest.raises(WriteError, match=rf"adapter: another process \(pid {writer.pid}\) is writing it now; "
                                             r"nothing was pushed"):
            push_to_hub(folder, "me/x")
    finally:
        finish(writer)


def test_one_process_cannot_write_a_name_twice_at_once_and_no_lock_stays(tmp_path):
    target = tmp_path / "x.bin"
    with owning(target):
        with pytest.raises(WriteError, match=rf"x\.bin: another process \(pid {os.getpid()}\) is writing it now"):
            write_file(target, lambda f: f.write(b"second"))
        assert (tmp_path / ".x.bin.lock").read_text() == f"{os.getpid()} writing it\n"
    assert not target.exists() and list(tmp_path.iterdir()) == []
    write_file(target, lambda f: f.write(b"first"))
    assert target.read_bytes() == b"first" and [p.name for p in tmp_path.iterdir()] == ["x.bin"]


# ---------------------------------------------------------------------------------------------
# 2. Full disks and read-only folders: a named error, the previous version byte-identical

@pytest.fixture
def disk(tmp_path):
    """A 2 MB tmpfs of its own (skipped where mounting is not allowed): a disk to fill or make read-only."""
    where = tmp_path / "disk"
    where.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root)")
    yield where
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(disk: Path, pages_left: int = 0) -> None:
    """Fill the disk to the last byte, but for `pages_left` pages of 4 KiB (a lock file fits; a plot does not)."""
    for i in range(pages_left):
        (disk / f".fill-{i}").write_bytes(b"x" * 4096)
    with contextlib.suppress(OSError), open(disk / ".fill", "wb") as f:
        while True:
            f.write(b"x" * 4096)
    for i in range(pages_left):
        (disk / f".fill-{i}").unlink()


def read_only(disk: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)


@pytest.mark.parametrize("pages_left", [0, 1])
def test_plot_on_a_full_disk_keeps_the_good_plot(disk, pages_left):
    run = disk / "run"
    metrics(run, 20)
    plot_run(run)
    metrics(run, 400, scale=3.0)  # a longer curve: a bigger file to write
    before = snapshot(run)
    fill(disk, pages_left)
    with pytest.raises(WriteError, match=r"run/loss\.svg: could not be written \(No space left on device\); "
                                         r"nothing was replaced"):
        plot_run(run)
    assert snapshot(run) == before


def test_the_end_of_run_plot_on_a_full_disk_warns_and_leaves_no_empty_file(disk):
    run = disk / "run"
    metrics(run, 400)
    fill(disk, 1)
    with pytest.warns(UserWarning, match=r"run/loss\.svg: could not be written \(No space left on device\); nothing "
                                         r"was written\. The loss plot was left out; the adapter was saved at "
                                         r".*run/adapter \(`minilora plot .*run` draws it later\)"):
        assert plot_at_end(run, run / "adapter") == []
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]  # no 0-byte loss.svg


def test_the_end_of_run_plot_never_fails_the_run_whatever_breaks(tmp_path, monkeypatch):
    import minilora.training.plots as plots
    metrics(tmp_path, 5)
    monkeypatch.setattr(plots, "loss_svg", lambda history: 1 / 0)
    with pytest.warns(UserWarning, match=r"loss\.svg: not drawn \(ZeroDivisionError: division by zero\)\. The loss "
                                         r"plot was left out; the adapter was saved at /x/adapter"):
        assert plot_at_end(tmp_path, "/x/adapter") == []


def test_a_run_on_a_completely_full_disk_fails_by_name_at_its_lock_file(saved_tiny, disk):
    (disk / "run").mkdir()
    fill(disk)
    with pytest.raises(WriteError, match=r"run/\.minilora\.lock: cannot write the run's lock file \(No space left on "
                                         r"device\); the run did not start"):
        with own_output_dir(disk / "run", resuming=False, overwrite=False):
            pass
    with pytest.raises(WriteError, match=r"run/\.minilora\.lock: cannot write the run's lock file \(No space left"):
        train(lora_model(saved_tiny), Tok, examples(8), None,
              TrainConfig(output_dir=str(disk / "run"), max_steps=2, micro_batch_size=2, batch_size=2, progress=False))


@pytest.mark.parametrize("pages_left", [0, 1])
def test_export_and_save_on_a_full_disk_keep_what_was_saved(saved_tiny, disk, pages_left):
    model = lora_model(saved_tiny)
    export_adapter(model, disk / "a.gguf")
    save_adapter(model, disk / "adapter")
    before = snapshot(disk)
    fill(disk, pages_left)
    other = lora_model(saved_tiny, std=0.3)
    with pytest.raises(WriteError, match=r"a\.gguf: could not be written \(No space left on device\); nothing was "
                                         r"replaced"):
        export_adapter(other, disk / "a.gguf")
    with pytest.raises(WriteError, match=r"adapter: No space left on device while writing .*; the previous version, "
                                         r"if any, is kept"):
        save_adapter(other, disk / "adapter")
    with pytest.raises(WriteError, match=r"b\.gguf: could not be written \(No space left on device\); nothing was "
                                         r"written"):
        export_adapter(other, disk / "b.gguf")
    assert snapshot(disk) == before
    assert torch.equal(read_adapter(disk / "adapter")[1]["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"],
                       model.model.layers[0].self_attn.q_proj.lora_A.weight)


def test_every_writer_in_a_read_only_folder_fails_by_name_and_changes_nothing(saved_tiny, disk, monkeypatch):
    model = lora_model(saved_tiny)
    run = disk / "run"
    metrics(run, 20)
    plot_run(run)
    export_adapter(model, disk / "a.gguf")
    save_adapter(model, disk / "adapter")
    before = snapshot(disk)
    read_only(disk)
    other = lora_model(saved_tiny, std=0.3)
    with pytest.raises(WriteError, match=r"run/loss\.svg: could not be written \(Read-only file system\); nothing was "
                                         r"replaced"):
        plot_run(run)
    with pytest.raises(WriteError, match=r"a\.gguf: could not be written \(Read-only file system\); nothing was replaced"):
        export_adapter(other, disk / "a.gguf")  # and its clean-up raises nothing more
    with pytest.raises(WriteError, match=r"m\.gguf: could not be written \(Read-only file system\); nothing was written"):
        export_merged(other, disk / "m.gguf", "q8_0")
    with pytest.raises(WriteError, match=r"adapter: Read-only file system while writing .*\.adapter\.lock; the "
                                         r"previous version, if any, is kept"):
        save_adapter(other, disk / "adapter")
    with pytest.raises(WriteError, match=r"run/\.minilora\.lock: cannot create the run's lock file \(Read-only file "
                                         r"system\)"):
        with own_output_dir(run, resuming=True, overwrite=False):
            pass
    with pytest.warns(UserWarning, match=r"loss\.svg: could not be written \(Read-only file system\)"):
        plot_at_end(run, disk / "adapter")
    assert snapshot(disk) == before
    load_adapter(lora_model(saved_tiny, std=0.3), disk / "adapter")  # readers still read a read-only folder
    import huggingface_hub
    from minilora.ship.hub import push_to_hub

    class FakeApi:  # and a push from it goes ahead: no one can be writing a read-only folder
        def create_repo(self, *a, **k): pass

        def create_commit(self, repo_id, operations, commit_message=None):
            return type("Info", (), {"commit_url": "https://hub/commit/1"})
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert push_to_hub(disk / "adapter", "me/x") == "https://hub/commit/1"


def test_permission_and_space_errors_are_named_without_a_mount(saved_tiny, tmp_path, monkeypatch):
    """The same paths where no tmpfs can be mounted: the calls raise what a full disk or a folder without
    permission raises."""
    model = lora_model(saved_tiny)
    run = tmp_path / "run"
    metrics(run, 20)
    plot_run(run)
    export_adapter(model, tmp_path / "a.gguf")
    save_adapter(model, tmp_path / "adapter")
    before = snapshot(tmp_path)
    real_open, real_os_open = builtins.open, os.open

    def no_permission(path, *a, **k):
        if str(path).endswith(".lock"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_os_open(path, *a, **k)
    monkeypatch.setattr(os, "open", no_permission)
    with pytest.raises(WriteError, match=r"loss\.svg: could not be written \(Permission denied\); nothing was replaced"):
        plot_run(run)
    with pytest.raises(WriteError, match=r"a\.gguf: could not be written \(Permission denied\); nothing was replaced"):
        export_adapter(model, tmp_path / "a.gguf")
    with pytest.raises(WriteError, match=r"adapter: Permission denied while writing .*\.adapter\.lock"):
        save_adapter(model, tmp_path / "adapter")
    monkeypatch.setattr(os, "open", real_os_open)

    class FullFile:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def full(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        return FullFile(f) if str(path).endswith(".partial") else f
    monkeypatch.setattr(builtins, "open", full)
    with pytest.raises(WriteError, match=r"loss\.svg: could not be written \(No space left on device\); nothing was "
                                         r"replaced"):
        plot_run(run)
    with pytest.raises(WriteError, match=r"a\.gguf: could not be written \(No space left on device\)"):
        export_adapter(lora_model(saved_tiny, std=0.3), tmp_path / "a.gguf")
    monkeypatch.setattr(builtins, "open", real_open)
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------
# 3. A kill between write_atomically's two renames: readers put the previous version back

def stage_kill(folder: Path, pid: int) -> Path:
    """The state a writer killed between its renames leaves: the folder moved aside, the new one not in."""
    aside = folder.with_name(f".{folder.name}.old-{pid}")
    folder.rename(aside)
    new = folder.with_name(f".{folder.name}.tmp-{pid}")
    new.mkdir()
    (new / "adapter_config.json").write_text("{")  # whatever the new one had: never read
    return aside


def test_readers_put_the_previous_adapter_back(saved_tiny, tmp_path):
    model = lora_model(saved_tiny)
    folder = tmp_path / "adapter"
    save_adapter(model, folder)
    before = snapshot(folder)
    pid = dead_pid()
    stage_kill(folder, pid)
    assert recover(folder) == folder
    assert snapshot(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # the dead writer's temporary dropped too
    load_adapter(lora_model(saved_tiny, std=0.3), folder)
    assert recover(tmp_path / "never-saved") is None
    assert list(tmp_path.iterdir()) == [folder]  # a reader that finds nothing to put back writes nothing


def test_model_folders_checkpoints_and_pushes_recover_too(saved_tiny, tmp_path):
    from minilora.ship.hub import push_to_hub
    model_dir = tmp_path / "merged"
    save_model(load_model(saved_tiny["llama-gqa"][1]), model_dir)
    stage_kill(model_dir, dead_pid())
    assert load_model(model_dir).config.hidden_size == 32  # load_model -> paths.resolve -> recover
    run = tmp_path / "run"
    run.mkdir()
    write_atomically(run / "checkpoint-2", lambda d: (d / "trainer_state.json").write_text("{}"))
    stage_kill(run / "checkpoint-2", dead_pid())
    assert [p.name for p in checkpoint_folders(run)] == ["checkpoint-2"]
    adapter = tmp_path / "adapter"
    save_adapter(lora_model(saved_tiny), adapter)
    stage_kill(adapter, dead_pid())
    with pytest.raises(Exception, match="hub repo id|HF_HUB_OFFLINE|no token"):
        push_to_hub(adapter, "not a repo id")  # refused, but only after the folder is back
    assert (adapter / "adapter_config.json").is_file()


RECOVER = """
    from pathlib import Path
    from minilora.formats.atomic import recover
    print(recover(Path(sys.argv[1])), flush=True)
"""


def test_racing_readers_all_find_the_folder(saved_tiny, tmp_path):
    folder = tmp_path / "adapter"
    save_adapter(lora_model(saved_tiny), folder)
    before = snapshot(folder)
    stage_kill(folder, dead_pid())
    readers = [child(RECOVER, str(folder)) for _ in range(6)]
    for r in readers:
        out, err = r.communicate(timeout=120)
        assert r.returncode == 0 and out.strip() == str(folder), err[-2000:]
    assert snapshot(folder) == before and sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


MID_SWAP = """
    import time
    from pathlib import Path
    from minilora.formats.atomic import owning
    folder = Path(sys.argv[1])
    with owning(folder):
        folder.rename(folder.with_name(f".{folder.name}.old-{os.getpid()}"))
        print("aside", flush=True)
        time.sleep(float(sys.argv[2]))
        folder.with_name(f".{folder.name}.old-{os.getpid()}").rename(folder)
"""


def test_a_reader_waits_for_a_live_writer_between_its_renames_or_names_the_aside(tmp_path):
    folder = tmp_path / "adapter"
    write_atomically(folder, lambda d: (d / "a.txt").write_text("old"))
    writer = child(MID_SWAP, str(folder), "0.5")
    wait_for(writer, "aside")
    assert recover(folder, wait=20) == folder and (folder / "a.txt").read_text() == "old"
    finish(writer)
    writer = child(MID_SWAP, str(folder), "5")
    try:
        wait_for(writer, "aside")
        with pytest.raises(CheckpointError, match=rf"adapter: missing while another process replaces it; its previous "
                                                  rf"version is at .*\.adapter\.old-{writer.pid}\. Try again"):
            recover(folder, wait=0.2)
    finally:
        finish(writer)


def test_an_aside_that_cannot_be_put_back_is_named(disk):
    folder = disk / "adapter"
    write_atomically(folder, lambda d: (d / "a.txt").write_text("old"))
    pid = dead_pid()
    stage_kill(folder, pid)
    read_only(disk)
    with pytest.raises(CheckpointError, match=rf"adapter: missing, but its previous complete version is at "
                                              rf".*\.adapter\.old-{pid} \(left by a process killed while replacing "
                                              r"it\), and it could not be put back \(Read-only file system\): rename "
                                              r"it to adapter"):
        recover(folder)


KILL_BETWEEN = """
    import time
    from pathlib import Path
    from conftest import lora_model
    from minilora.formats import atomic
    from minilora.lora.peft_files import save_adapter
    atomic._exchange = lambda a, b: False  # the two-rename path (systems without RENAME_EXCHANGE)
    real = Path.rename
    def rename(self, target):
        out = real(self, target)
        if ".old-" in Path(target).name:
            print("between", flush=True)
            time.sleep(60)
        return out
    Path.rename = rename
    save_adapter(lora_model({"llama-gqa": (None, sys.argv[1])}, std=0.3), sys.argv[2])
"""


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_sigkill_between_the_two_renames_is_recovered(saved_tiny, tmp_path):
    folder = tmp_path / "adapter"
    save_adapter(lora_model(saved_tiny), folder)
    before = snapshot(folder)
    writer = child(KILL_BETWEEN, str(saved_tiny["llama-gqa"][1]), str(folder))
    wait_for(writer, "between")
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert not folder.exists()  # what the issue saw: no adapter/, the old one hidden aside
    assert {p.name for p in tmp_path.iterdir()} >= {f".adapter.old-{writer.pid}", f".adapter.tmp-{writer.pid}"}
    assert recover(folder) == folder and snapshot(folder) == before
    load_adapter(lora_model(saved_tiny, std=0.3), folder)
    save_adapter(lora_model(saved_tiny, std=0.3), folder)  # and the next write leaves nothing stale
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


KILL_AFTER_SWAP = """
    import time
    from conftest import lora_model
    from minilora.formats import atomic
    from minilora.lora.peft_files import save_adapter
    real = atomic._exchange
    def exchange(a, b):
        if not real(a, b):
            print("no exchange", flush=True)
            return False
        print("swapped", flush=True)
        time.sleep(60)
    atomic._exchange = exchange
    save_adapter(lora_model({"llama-gqa": (None, sys.argv[1])}, std=0.3), sys.argv[2])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2")
def test_where_the_system_swaps_in_one_step_a_kill_never_leaves_the_folder_missing(saved_tiny, tmp_path):
    folder = tmp_path / "adapter"
    save_adapter(lora_model(saved_tiny), folder)
    writer = child(KILL_AFTER_SWAP, str(saved_tiny["llama-gqa"][1]), str(folder))
    line = writer.stdout.readline().strip()
    if line != "swapped":
        finish(writer)
        pytest.skip(f"this file system has no RENAME_EXCHANGE ({line!r})")
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    save_adapter(lora_model(saved_tiny, std=0.3), tmp_path / "new")
    assert snapshot(folder) == snapshot(tmp_path / "new")  # the new one, complete, at its name
    save_adapter(lora_model(saved_tiny), folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "new"]
