"""The README and docs/ are true to the code: the quick start's snippets run as a newcomer runs them, every
``moekernels.*`` call in a snippet names parameters the function has (and, where it lists them all, their
defaults), and every relative link resolves, anchors included."""

import ast
import importlib
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moekernels

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```.*?^```", flags=re.M | re.S)


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.M | re.S)


def relative_links(path: Path) -> list[tuple[str, str]]:
    """(target, anchor) of every link and image in a Markdown file, outside code, that is not a URL; the target
    relative to the repository root ('' for an anchor into the file itself)."""
    text = FENCE.sub("", path.read_text())
    links = []
    for href in re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", href):
            continue
        target, _, anchor = href.partition("#")
        if target:
            target = os.path.relpath(os.path.normpath(path.parent / target), ROOT)
        links.append((target, anchor))
    return links


def anchors(path: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#{1,6} (.+)$", FENCE.sub("", path.read_text()), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_relative_link_resolves(doc):
    for target, anchor in relative_links(doc):
        path = ROOT / target if target else doc
        assert path.exists(), f"{doc.name} links to {target}, which does not exist"
        if anchor:
            assert anchor in anchors(path), f"{doc.name} links to {target}#{anchor}: no such heading"


def test_readme_links_the_reference_and_fits_in_a_few_screens():
    readme = (ROOT / "README.md").read_text()
    assert ("docs/API.md", "") in relative_links(ROOT / "README.md")
    assert len(readme.splitlines()) <= 250, "the reference goes in docs/API.md"
    # The two commands, verbatim, in the quick start.
    quick = readme.split("## Quick start")[1].split("\n## ")[0]
    for extra, run in (("bench", "python3 -m benchmarks.run"), ("test", "python3 -m pytest")):
        assert (f'python3 -m pip install torch==2.13.0 triton==3.6.0 "numpy<2.4" && '
                f'python3 -m pip install -e ".[{extra}]" && {run}') in quick


def _resolve(dotted: str):
    obj = moekernels
    for name in dotted.split(".")[1:]:
        obj = getattr(obj, name) if hasattr(obj, name) else importlib.import_module(f"{obj.__name__}.{name}")
    return obj


def _calls():
    for doc in DOCS:
        for block in python_blocks(doc.read_text()):
            for node in ast.walk(ast.parse(block)):
                parts, f = [], getattr(node, "func", None)
                while isinstance(f, ast.Attribute):
                    parts.append(f.attr)
                    f = f.value
                if isinstance(node, ast.Call) and isinstance(f, ast.Name) and f.id == "moekernels":
                    yield doc.name, ".".join(["moekernels", *reversed(parts)]), node


CALLS = list(_calls())


def test_the_docs_call_every_public_function():
    public = {n for n in moekernels.__all__ if inspect.isfunction(getattr(moekernels, n)) or n in ("MoE", "ExpertsLoRA")}
    called = {name.removeprefix("moekernels.") for _, name, _ in CALLS}
    assert "topk_routing" in public and public <= called, f"no snippet calls {sorted(public - called)}"


def _literal(node: ast.expr, doc: str):
    """A keyword's value where it is a constant or a torch attribute (torch.bfloat16), else the node itself."""
    try:
        return ast.literal_eval(node)
    except ValueError:
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "torch":
            return getattr(torch, node.attr)
        return node


@pytest.mark.parametrize("doc,name,call", CALLS, ids=[f"{d}:{n}:{c.lineno}" for d, n, c in CALLS])
def test_snippet_call_matches_the_signature(doc, name, call):
    """Keywords the function has, no more positional arguments than it takes. A call that names every parameter,
    the positional ones by their names and the others by constants, is a signature: its positional names are the
    parameters' and its constants their defaults."""
    params = inspect.signature(_resolve(name)).parameters
    keywords = {k.arg: _literal(k.value, doc) for k in call.keywords}
    assert set(keywords) <= set(params), f"{doc}: {name} has no {sorted(set(keywords) - set(params))}"
    if any(isinstance(a, ast.Constant) and a.value is Ellipsis for a in call.args):
        return  # dispatch(..., fp8=True): the positional arguments are left out
    names = list(params)
    assert len(call.args) <= len(names), f"{doc}: {name} takes {names}"
    if (len(call.args) + len(keywords) < len(names) or not all(isinstance(a, ast.Name) for a in call.args)
            or any(isinstance(v, ast.AST) for v in keywords.values())):
        return  # a use, not a signature
    assert [a.id for a in call.args] == names[:len(call.args)], f"{doc}: {name}'s parameters are {names}"
    for key, value in keywords.items():
        if params[key].default is not inspect.Parameter.empty:
            assert value == params[key].default, f"{doc}: {name}({key}={value!r}): the default is {params[key].default!r}"


# What each quick-start snippet must have done, checked after it in the same interpreter.
QUICK_CHECKS = [
    "assert y.shape == (T, H) and y.isfinite().all()\n",
    "assert y.shape == (4, 16, 64) and layer.w_gate_up.grad is not None\n",
    "assert model.config._experts_implementation == 'moekernels'\n"
    "with torch.profiler.profile() as prof:\n"
    "    model(input_ids=torch.tensor([[1, 2, 3]]))\n"
    "assert 'moekernels::fused_moe' in {e.key for e in prof.key_averages()}\n",
]
# The third snippet loads a hub checkpoint: here a tiny Qwen3-MoE saved in its place (no network).
HUB_ID = '"Qwen/Qwen3-30B-A3B"'
TINY_CHECKPOINT = (
    "import sys, torch, transformers\n"
    "config = transformers.Qwen3MoeConfig(vocab_size=32, hidden_size=32, intermediate_size=64,\n"
    "    moe_intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,\n"
    "    num_experts=4, num_experts_per_tok=2)\n"
    "transformers.AutoModelForCausalLM.from_config(config).save_pretrained(sys.argv[1])\n"
)


@pytest.mark.parametrize("which", range(3), ids=["op", "layer", "transformers"])
def test_readme_quick_start_snippet_runs(which, tmp_path):
    """Each snippet as a newcomer runs it: a fresh interpreter in another folder, the installed package (here the
    checkout), no Triton interpreter."""
    quick = (ROOT / "README.md").read_text().split("## Quick start")[1].split("\n## ")[0]
    blocks = python_blocks(quick)
    assert len(blocks) == len(QUICK_CHECKS)
    code = blocks[which]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("TRITON_INTERPRET", None)
    if which == 2:
        pytest.importorskip("transformers")
        assert code.count(HUB_ID) == 1
        subprocess.run([sys.executable, "-c", TINY_CHECKPOINT, str(tmp_path / "tiny")], cwd=tmp_path, env=env,
                       check=True, capture_output=True, timeout=300)
        code = code.replace(HUB_ID, repr(str(tmp_path / "tiny"))) + "import torch\n"
    out = subprocess.run([sys.executable, "-c", code + QUICK_CHECKS[which]], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"{code}\n{out.stderr[-4000:]}"
