"""The package as built and installed: a wheel ships the CUDA sources (package data ``pd_kernels/csrc/``) and
the JIT build of the installed package finds them, outside any checkout; a source checkout finds its own
top-level ``csrc/``."""
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

import pd_kernels._cuda_ext as cuda_ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")


def _csrc_files() -> dict[str, bytes]:
    out = {}
    for root, _, files in os.walk(CSRC):
        for f in files:
            if f.endswith((".cu", ".cuh", ".h", ".cpp")):
                p = os.path.join(root, f)
                with open(p, "rb") as fh:
                    out[os.path.relpath(p, CSRC).replace(os.sep, "/")] = fh.read()
    return out


def test_checkout_finds_its_csrc():
    files = _csrc_files()
    assert any(f.endswith(".cu") for f in files) and any(f.startswith("bindings/") for f in files)
    assert cuda_ext.source_dir() == CSRC
    want = sorted(os.path.join(CSRC, f) for f in files if f.endswith(".cu")) + sorted(
        os.path.join(CSRC, f) for f in files if f.startswith("bindings/") and f.endswith(".cpp"))
    assert cuda_ext.sources() == want


def test_missing_sources_name_both_places(monkeypatch, tmp_path):
    monkeypatch.setattr(cuda_ext, "SOURCE_DIRS", (str(tmp_path / "a"), str(tmp_path / "b")))
    with pytest.raises(FileNotFoundError, match="built without its csrc"):
        cuda_ext.sources()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """A wheel built from a copy of the checkout (the build writes build/ and *.egg-info next to setup.py)."""
    pytest.importorskip("setuptools", minversion="70.1")  # bdist_wheel built in; CI builds with isolation instead
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist")
    for name in ("pd_kernels", "csrc"):
        shutil.copytree(os.path.join(ROOT, name), src / name, ignore=ignore)
    for name in ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (whl,) = (tmp / "dist").glob("pd_kernels-*.whl")
    return whl


def test_wheel_ships_the_cuda_sources(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        shipped = {n[len("pd_kernels/csrc/"):]: z.read(n) for n in names if n.startswith("pd_kernels/csrc/")}
    assert shipped == _csrc_files()  # every file, byte for byte, and nothing else
    assert not any(n.startswith("csrc/") for n in names)  # not a top-level package of site-packages
    assert "pd_kernels/__main__.py" in names and "pd_kernels/ops/triton/span_attention.py" in names
    assert "pd_kernels/cli/__init__.py" in names and "pd_kernels/cli/demo.py" in names   # the command line


def test_wheel_ships_the_tiny_model(wheel):
    """The demo's default model is package data: every file of the checkpoint, byte for byte."""
    from pd_kernels.models import TINY_PD_DIR

    prefix = "pd_kernels/models/tiny_pd/"
    with zipfile.ZipFile(wheel) as z:
        shipped = {n[len(prefix):]: z.read(n) for n in z.namelist() if n.startswith(prefix)}
    want = {}
    for f in os.listdir(TINY_PD_DIR):
        with open(os.path.join(TINY_PD_DIR, f), "rb") as fh:
            want[f] = fh.read()
    assert "model.safetensors" in want and shipped == want


def test_installed_wheel_finds_its_sources_outside_the_checkout(wheel, tmp_path):
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    probe = ("import json, pd_kernels, pd_kernels._cuda_ext as c; "
             "print(json.dumps([pd_kernels.__file__, c.source_dir(), c.sources()]))")
    env = dict(os.environ, PYTHONPATH=str(site))
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    import json

    init, source_dir, sources = json.loads(out.stdout.strip().splitlines()[-1])
    assert init == str(site / "pd_kernels" / "__init__.py")
    assert source_dir == str(site / "pd_kernels" / "csrc")
    rel = sorted(os.path.relpath(s, source_dir).replace(os.sep, "/") for s in sources)
    assert rel == sorted(f for f in _csrc_files() if f.endswith((".cu", ".cpp")))
