"""The command line as a user runs it (subprocesses, no network)."""

import subprocess
import sys


def cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "qwen_mlx.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_generate_prints_plain_text_when_piped(tiny_checkpoint):
    run = cli("generate", "-m", str(tiny_checkpoint("qwen3")), "--prompt", "hi", "--max-tokens", "5", "--temp", "0")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() and "\x1b" not in run.stdout and "\x1b" not in run.stderr
    again = cli("generate", "-m", str(tiny_checkpoint("qwen3")), "--prompt", "hi", "--max-tokens", "5", "--temp", "0")
    assert again.stdout == run.stdout  # greedy is deterministic


def test_stats_line(tiny_checkpoint):
    run = cli("generate", "-m", str(tiny_checkpoint("qwen3")), "-p", "hi", "--max-tokens", "4", "--verbose",
              "--no-think")
    assert run.returncode == 0 and "4 tokens at" in run.stderr and "finished: length" in run.stderr


def test_prompt_from_stdin(tiny_checkpoint):
    args = ["generate", "-m", str(tiny_checkpoint("qwen3")), "--max-tokens", "3", "--temp", "0", "--hide-think"]
    piped = subprocess.run([sys.executable, "-m", "qwen_mlx.cli", *args, "--prompt", "-"], input="hi",
                           capture_output=True, text=True, timeout=120)
    direct = cli(*args, "--prompt", "hi")
    assert piped.returncode == 0 and piped.stdout == direct.stdout


def test_bad_flags_get_argparse_errors():
    run = cli("generate", "--prompt", "hi", "--max-tokens", "many")
    assert run.returncode == 2 and "argument --max-tokens: invalid int value: 'many'" in run.stderr
    run = cli("frobnicate")
    assert run.returncode == 2 and "invalid choice: 'frobnicate'" in run.stderr


def test_offline_default_model_names_the_flag():
    run = cli("generate", "--prompt", "hi")  # HF_HUB_OFFLINE=1 in the tests; the default model is not cached
    assert run.returncode == 2 and "--model PATH" in run.stderr and "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1


def test_help_is_fast_and_complete():
    for command in ("generate", "bench", "info"):
        run = cli(command, "--help", timeout=30)
        assert run.returncode == 0 and "--model" in run.stdout


def test_bad_input_exits_2_with_one_line(tmp_path):
    run = cli("info", "--model", str(tmp_path / "missing"))
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr == f"qwen-mlx: error: {tmp_path / 'missing'}: no such checkpoint directory\n"
    debug = cli("info", "--model", str(tmp_path / "missing"), "--debug")
    assert debug.returncode == 2 and "Traceback" in debug.stderr and "LoadError" in debug.stderr
    assert debug.stderr.endswith(run.stderr)


def test_internal_error_is_one_line_and_debug_shows_the_traceback(monkeypatch, capsys):
    from qwen_mlx import cli as cli_module
    from qwen_mlx import commands

    def broken(args):
        raise RuntimeError("index out of range\n  in a place")

    monkeypatch.setattr(commands, "info", broken)
    assert cli_module.main(["info", "--model", "x"]) == 1
    assert capsys.readouterr().err == ("qwen-mlx: error: internal error: RuntimeError: index out of range in a place "
                                       "(run with --debug for the traceback)\n")
    for argv in (["--debug", "info", "--model", "x"], ["info", "--model", "x", "--debug"]):
        assert cli_module.main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("Traceback (most recent call last):") and "in broken" in err
        assert err.rstrip().endswith("RuntimeError: index out of range\n  in a place")


def test_a_failing_disk_is_one_line_naming_the_file(monkeypatch, capsys):
    from qwen_mlx import cli as cli_module
    from qwen_mlx import commands

    def disk_full(args):
        raise OSError(28, "No space left on device", "/tmp/out/model.safetensors")

    monkeypatch.setattr(commands, "info", disk_full)
    assert cli_module.main(["info", "--model", "x"]) == 1
    assert capsys.readouterr().err == "qwen-mlx: error: /tmp/out/model.safetensors: No space left on device\n"


def test_interrupt_exits_130(monkeypatch):
    from qwen_mlx import cli as cli_module
    from qwen_mlx import commands

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(commands, "info", interrupted)
    assert cli_module.main(["info", "--model", "x"]) == 130
