"""The CLI on a plain `pip install .` (no extras): `make demo` installs no extra, so building the parser must not
import FastAPI, TensorBoard, datasets, controlnet-aux or torchao, and `serve` without its extra is one line."""
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
EXTRAS = ("fastapi", "uvicorn", "multipart", "python_multipart", "prometheus_client", "starlette", "tensorboard",
          "datasets", "webdataset", "controlnet_aux", "timm", "torchao", "httpx", "playwright")
BLOCK = f"import sys\nfor m in {EXTRAS!r}:\n    sys.modules[m] = None  # importing it raises ImportError\n"


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + code], capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"})


def test_every_command_parses_without_the_extras():
    out = run("from t2iadapter.cli import main\n"
              "for cmd in ('demo', 'generate', 'eval', 'extract', 'convert', 'info', 'export-base', 'train', 'serve',"
              " 'compile'):\n"
              "    try:\n"
              "        main([cmd, '--help'])\n"
              "    except SystemExit as exc:\n"
              "        assert exc.code in (0, None), (cmd, exc.code)\n"
              "print('parsed')\n")
    assert out.returncode == 0 and "parsed" in out.stdout, out.stderr[-3000:]


def test_serve_without_its_extra_is_one_line():
    out = run("from t2iadapter.cli import main\nsys.exit(main(['serve']))\n")
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr and "t2iadapter[serve]" in out.stderr, out.stderr[-3000:]
