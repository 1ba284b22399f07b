"""How a command ends: the process group is shut down, and a multi-process rank exits with its code after the
interpreter's exit work (threads, atexit) but without the C++ teardown. Each case runs in a fresh interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO

ENDING = """
import atexit, concurrent.futures, sys, threading, time
from rlhf.cli import exit_process

out = sys.argv[1]


class Torn:  # stands in for the objects (a process group, C++ state) destroyed at interpreter teardown
    def __init__(self, path):
        self.handle = open(path, "a")  # builtins are gone by the time teardown reaches this object

    def __del__(self):
        self.handle.write("teardown\\n")
        self.handle.flush()


held = Torn(out)
atexit.register(lambda: open(out, "a").write("atexit\\n"))
pool = concurrent.futures.ThreadPoolExecutor(1)
pool.submit(lambda: (time.sleep(0.3), open(out, "a").write("pool\\n")))
threading.Thread(target=lambda: (time.sleep(0.3), open(out, "a").write("thread\\n"))).start()
exit_process(3)
raise SystemExit("exit_process returned")
"""


def run_python(code: str, *args: str, world_size: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("WORLD_SIZE", None)
    if world_size is not None:
        env["WORLD_SIZE"] = world_size
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_rank_of_a_multi_process_launch_exits_with_its_code_after_threads_and_atexit_before_teardown(
    tmp_path,
):
    out = tmp_path / "order.txt"
    done = run_python(ENDING, str(out), world_size="2")
    assert done.returncode == 3, done.stderr
    # Worker threads finished before the atexit handlers ran, as at a normal interpreter exit.
    assert sorted(out.read_text().split()[:2]) == ["pool", "thread"]
    # ... and then the process ended, without tearing the interpreter's objects down.
    assert out.read_text().split()[2:] == ["atexit"]


def test_one_process_exits_the_ordinary_way(tmp_path):
    out = tmp_path / "order.txt"
    done = run_python(ENDING, str(out))
    assert done.returncode == 3, done.stderr
    assert sorted(out.read_text().split()) == ["atexit", "pool", "teardown", "thread"]


def test_run_guarded_shuts_the_process_group_down_on_success_and_on_bad_input(tmp_path):
    done = run_python(
        """
        import sys
        import torch.distributed as dist
        from rlhf.cli import run_guarded
        from rlhf.config import ConfigError

        def fail():
            raise ConfigError("bad")

        for action, code in ((lambda: None, 0), (fail, 2)):
            dist.init_process_group("gloo", init_method="file://" + sys.argv[1] + str(code), rank=0, world_size=1)
            assert run_guarded(action) == code
            assert not dist.is_initialized()
        print("ok")
        """,
        str(tmp_path / "store"),
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            ["inspect", "neurons", "--model", "m", "--data", "d.jsonl", "--top-k", "0"],
            "--top-k: must be 1 or more",
        ),
        (
            ["inspect", "diff", "--before", "a", "--after", "b", "--prompts", "p", "--excerpt-tokens", "0"],
            "--excerpt-tokens",
        ),
        (
            ["reward", "score", "--model", "m", "--data", "d.jsonl", "--batch-size", "0"],
            "--batch-size: must be 1",
        ),
        (["eval", "--policy", "m", "--prompts", "p.jsonl", "--out", "."], "--out: . is a directory"),
        (["chat", "m", "--max-new-tokens", "0"], "--max-new-tokens: must be 1 or more"),
    ],
)
def test_a_command_line_value_that_cannot_work_is_a_usage_error_before_any_work(
    argv, message, monkeypatch, capsys
):
    """Each of these was a traceback after the model had loaded (or, for --out, after the whole evaluation)."""
    from conftest import forbid_calls

    import rlhf.models
    from rlhf.cli import main

    forbid_calls(monkeypatch, rlhf.models, "load_tokenizer", "load_causal_lm", "load_scalar_model")
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_eval_and_reward_score_write_their_output_file_whole_making_its_directory(tmp_path):
    from rlhf.checkpoint import write_text_atomic

    write_text_atomic(tmp_path / "new" / "dir" / "out.json", "{}")
    assert (tmp_path / "new" / "dir" / "out.json").read_text() == "{}"
    assert [p.name for p in (tmp_path / "new" / "dir").iterdir()] == ["out.json"]  # no temporary file left
