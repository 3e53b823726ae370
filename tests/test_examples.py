"""Every script in examples/ runs as a user runs it: a fresh interpreter, another working directory, no Triton
interpreter, and exits 0 after printing its "check:" line (each asserts on what it computes, so it can fail)."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


def test_every_readme_example_link_exists():
    readme = (ROOT / "README.md").read_text()
    linked = {p.name for p in EXAMPLES if f"examples/{p.name}" in readme}
    assert len(EXAMPLES) >= 4
    assert linked == {p.name for p in EXAMPLES}, "examples the README does not link"


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(script, tmp_path):
    if script.name == "transformers_backend.py":
        pytest.importorskip("transformers")
    if script.name == "train_torchtitan.py":
        pytest.importorskip("torchtitan")  # the torchtitan extra
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("TRITON_INTERPRET", None)  # a user's run: CPU tensors take the torch backend
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, f"{script.name} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    assert any(line.startswith("check:") for line in out.stdout.splitlines()), out.stdout
    # Nothing a user did not ask for: Kineto's profiler printed "USDT: ... profiler_start" lines.
    assert "profiler_start" not in out.stdout + out.stderr, out.stderr[-2000:]
