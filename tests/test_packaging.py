"""Packaging: the console scripts, the pinned stack, and the import name of transforms/."""

from __future__ import annotations

import re
from importlib.metadata import entry_points, requires
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_console_scripts_exist() -> None:
    scripts = {ep.name: ep for ep in entry_points(group="console_scripts")}
    for name in ("dp-train", "dp-node", "dp-synth"):
        assert name in scripts, name
        assert callable(scripts[name].load())


def test_node_without_a_bundle_says_how_to_get_one_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no runs/demo/bundle here
    main = next(ep for ep in entry_points(group="console_scripts") if ep.name == "dp-node").load()
    assert main(["--metrics-port", "-1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no bundle" in err and "make demo-bundle" in err


@pytest.mark.parametrize("name", ["dp-train", "dp-synth", "dp-node"])
def test_available_commands_explain_themselves(name: str, capsys: pytest.CaptureFixture) -> None:
    main = next(ep for ep in entry_points(group="console_scripts") if ep.name == name).load()
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    assert "Examples" in capsys.readouterr().out


def test_torch_and_torchvision_are_pinned_exactly() -> None:
    pins = {
        re.split(r"[=<>!~ ;\[]", r, maxsplit=1)[0].lower(): r
        for r in requires("deep-pneumonia") or []
    }
    assert pins["torch"].replace(" ", "") == "torch==2.14.1"
    assert pins["torchvision"].replace(" ", "") == "torchvision==0.29.1"


def test_the_transforms_folder_is_imported_as_dp_transforms_only() -> None:
    import dp_transforms

    assert Path(dp_transforms.__file__).parent == ROOT / "transforms"
    offenders = []
    for path in ROOT.glob("**/*.py"):
        if ".venv" in path.parts:
            continue
        for line in path.read_text().splitlines():
            if re.match(r"\s*(import transforms\b|from transforms\b)", line):
                offenders.append(f"{path.relative_to(ROOT)}: {line.strip()}")
    assert not offenders, "import dp_transforms instead (docs/decisions.md):\n" + "\n".join(
        offenders
    )


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text().splitlines()
    first_block = readme[
        readme.index("```bash") + 1 : readme.index("```", readme.index("```bash") + 1)
    ]
    assert [line.split("#")[0].strip() for line in first_block] == ["make run", "make test"]
    assert "exec make test" in (ROOT / ".ci" / "run").read_text()
