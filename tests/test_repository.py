"""The repository keeps its promises: consistent environment files, notebooks a newcomer can open
(badges that resolve, committed outputs, a setup cell), and docs that list what exists."""

import json
import re
import sys
from pathlib import Path

import pytest
import yaml

import mmlib

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib
from mmlib.data import ATTRIBUTES, MODALITIES, REVEALS
from mmlib.overview import LESSONS

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_there_are_notebooks():
    assert [p.name for p in NOTEBOOKS][:1] == ["00_tour.ipynb"]


def test_environment_yml_installs_the_package_from_pyproject():
    environment = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = [d for d in environment["dependencies"] if isinstance(d, str)]
    pip = next(d["pip"] for d in environment["dependencies"] if isinstance(d, dict))
    python = next(d for d in conda if d.startswith("python"))
    assert python == "python" + PYPROJECT["project"]["requires-python"]
    assert pip == ["-e .[dev]"], "all Python dependencies come from pyproject.toml"
    assert set(conda) == {python, "pip"}, "no conda package may duplicate (or contradict) pyproject.toml"
    assert "dev" in PYPROJECT["project"]["optional-dependencies"]


def test_dependencies_are_lower_bounds_that_torch_2_13_satisfies():
    requirements = PYPROJECT["project"]["dependencies"] + PYPROJECT["project"]["optional-dependencies"]["dev"]
    for requirement in requirements:
        specifier = requirement.split(";")[0]  # what follows ';' is an environment marker
        assert "==" not in specifier and "<" not in specifier, f"no exact pins or caps: {requirement}"
    torch = next(r for r in requirements if re.match(r"torch\b", r))
    minimum = tuple(int(x) for x in torch.split(">=")[1].split("."))
    assert minimum <= (2, 13, 0)
    for name in ("pytest", "nbval", "pytest-xdist", "jupyterlab", "ipykernel"):
        assert any(r.startswith(name) for r in PYPROJECT["project"]["optional-dependencies"]["dev"]), name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_opens_with_title_badge_and_setup_cell(path):
    notebook = json.loads(path.read_text())
    cells = notebook["cells"]
    first = "".join(cells[0]["source"])
    assert cells[0]["cell_type"] == "markdown" and first.startswith("# ")
    badges = re.findall(r"https://colab\.research\.google\.com/github/([^)\s]+)", first)
    assert badges, "the first cell needs an Open in Colab badge"
    for target in badges:
        repository, _, relative = target.partition("/blob/main/")
        assert repository == mmlib.REPOSITORY
        assert (ROOT / relative).is_file(), f"badge points to a missing notebook: {relative}"
        assert relative == f"notebooks/{path.name}", "a notebook's badge opens that notebook"
    setup = next(c for c in cells if c["cell_type"] == "code")
    source = "".join(setup["source"])
    assert 'if "google.colab" in sys.modules' in source, "install only inside Colab"
    assert mmlib.REPOSITORY_URL in source
    assert "config.describe()" in source, "print the device, scale and seed"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_with_a_real_run(path):
    assert path.stat().st_size < 1024 * 1024, "keep each notebook under 1 MiB"
    notebook = json.loads(path.read_text())
    code = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    counts = [c["execution_count"] for c in code]
    assert None not in counts, "commit notebooks with the outputs of a full run (make course)"
    assert counts == list(range(1, len(code) + 1)), "one run, top to bottom"
    assert any(c["outputs"] for c in code)
    for cell in code:
        for output in cell["outputs"]:
            assert output.get("output_type") != "error", "committed outputs must not hold errors"
    assert any("assert " in "".join(c["source"]) for c in code), "a lesson asserts what it measures"
    assert "## Exercises" in "".join("".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "markdown")


def test_readme_lesson_table_lists_every_notebook():
    readme = (ROOT / "README.md").read_text()
    for path in NOTEBOOKS:
        assert f"(notebooks/{path.name})" in readme, f"README's lesson table lacks {path.name}"
    assert "make lab" in readme and "make test" in readme


def test_lessons_overview_knows_every_notebook():
    assert {path.name for path in NOTEBOOKS} <= {lesson[0] for lesson in LESSONS}


def test_datasheet_table_matches_reveals():
    datasheet = (ROOT / "data" / "README.md").read_text()
    for modality in MODALITIES:
        row = re.search(rf"^\| {modality} \|(.*)\|$", datasheet, flags=re.MULTILINE)
        assert row, f"datasheet lacks a row for {modality}"
        marks = [cell.strip() for cell in row.group(1).split("|")]
        assert marks == ["yes" if a in REVEALS[modality] else "-" for a in ATTRIBUTES], modality


def test_ci_runs_only_make_test():
    script = (ROOT / ".ci" / "run").read_text()
    commands = [line for line in script.splitlines() if line.strip() and not line.startswith("#")]
    assert commands[-1].strip() == "make test"


def test_nbval_waits_for_a_slow_cells_outputs():
    """The root conftest raises nbval's hard-coded 5 s wait for a cell's outputs (a loaded CI
    machine once failed lesson 5 on it): collecting a notebook gives cells the longer wait."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("root_conftest", ROOT / "conftest.py")
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)

    seen = []

    class Collect:
        def pytest_collection_finish(self, session):
            seen.extend(getattr(item, "output_timeout", None) for item in session.items)

    code = pytest.main(["--nbval-lax", "--nbval-current-env", "--collect-only", "-q", "-p", "no:cacheprovider",
                        "--rootdir", str(ROOT), str(NOTEBOOKS[0])], plugins=[Collect()])
    assert code == 0 and seen
    assert set(seen) == {conftest.NBVAL_OUTPUT_TIMEOUT} and conftest.NBVAL_OUTPUT_TIMEOUT >= 60


def test_make_recipes_let_python_cache_bytecode():
    """With PYTHONDONTWRITEBYTECODE in the environment, every process of make test compiled torch,
    transformers and diffusers again (the venv is installed --no-compile): the Makefile's recipes
    run without it (benchmarks/startup.py measures the difference)."""
    import os
    import subprocess

    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    shown = subprocess.run(["make", "-s", "-C", str(ROOT), "--eval", 'shown: ; @echo "[$$PYTHONDONTWRITEBYTECODE]"',
                            "shown"], env=env, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip() == "[]"


def test_every_weight_loader_asks_for_safetensors():
    """A hub checkpoint or a saved folder is read from safetensors only: every model and pipeline
    ``from_pretrained`` passes ``use_safetensors=True`` or goes through `from_pretrained_safely`
    (tokenizers, processors and peft's adapter, checked by path, aside)."""
    import ast

    exempt = {"AutoTokenizer", "PreTrainedTokenizerFast", "AutoImageProcessor", "AutoFeatureExtractor", "PeftModel"}
    found, missing = 0, []
    for path in sorted((ROOT / "mmlib").rglob("*.py")):
        tree = ast.parse(path.read_text())
        calls = [c for c in ast.walk(tree) if isinstance(c, ast.Call)]
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and node.attr == "from_pretrained") or \
                    ast.unparse(node.value).split(".")[-1] in exempt or ast.unparse(node.value) in ("cls", "Decoder"):
                continue
            found += 1
            direct = [c for c in calls if c.func is node and any(
                k.arg == "use_safetensors" and getattr(k.value, "value", None) is True for k in c.keywords)]
            wrapped = [c for c in calls if ast.unparse(c.func).endswith("from_pretrained_safely") and node in c.args]
            if not (direct or wrapped):
                missing.append(f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(node.value)}.from_pretrained")
    assert found >= 8 and not missing, missing
