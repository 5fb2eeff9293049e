"""The README's recipe keys are the dataclasses' fields, section by section, both ways: a key added to a
dataclass and not documented (or documented and gone) fails here."""

import dataclasses
import re
from pathlib import Path

from minilora.recipe import SECTIONS

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_recipe_key_is_documented_and_every_documented_key_exists():
    text = README.read_text().split("## Recipe keys", 1)[1].split("\n## ", 1)[0]
    tables = re.split(r"^`\[(\w+)\]`", text, flags=re.M)[1:]
    documented = {name: re.findall(r"^\| `(\w+)` \|", body, re.M) for name, body in zip(tables[::2], tables[1::2])}
    assert set(documented) == set(SECTIONS)
    for name, cls in SECTIONS.items():
        assert documented[name] == [f.name for f in dataclasses.fields(cls)], name
