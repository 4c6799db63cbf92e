"""The documents a user reads match the software: README commands, example config, every setting listed."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from xraybatch.settings import Settings, as_toml, load_settings

ROOT = Path(__file__).resolve().parents[1]


def test_readme_gives_exactly_the_two_commands_and_make_has_them() -> None:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Two commands.*?```sh\n(.*?)```", readme, re.DOTALL)
    assert block is not None
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.MULTILINE) and re.search(r"^test:", makefile, re.MULTILINE)
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_example_config_lists_every_setting_and_loads() -> None:
    example = ROOT / "deploy" / "xraybatch.example.toml"
    settings = load_settings(example, environ={})
    assert settings == dataclasses.replace(Settings(), workdir=Path("/var/lib/xraybatch"))
    body = "\n".join(line for line in example.read_text().splitlines() if not line.startswith("# "))
    assert body.strip() == as_toml(settings).strip()  # regenerate with `xraybatch config show --workdir ...`
