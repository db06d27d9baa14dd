import json
import subprocess
import sys

from egm_edge import __version__
from egm_edge.cli import main


def test_version(capsys):
    try:
        main(["--version"])
    except SystemExit as e:
        assert e.code == 0
    assert __version__ in capsys.readouterr().out


def test_info_json(capsys):
    assert main(["info", "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["egm_edge"] == __version__
    assert any(e.startswith("onnxruntime:CPUExecutionProvider") for e in facts["executors"])
    assert facts["tensorrt_importable"] in (True, False)


def test_console_script_runs_in_a_fresh_interpreter():
    out = subprocess.run([sys.executable, "-m", "egm_edge", "info"], capture_output=True, text=True, check=True).stdout
    assert "executors:" in out and "CUDA available:" in out


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out
