"""The docs against the code: the configuration reference is what `python -m warp_dist.configdoc` prints, and every
config field the README and docs/ name exists."""

from __future__ import annotations

import re

from tests.conftest import ROOT
from warp_dist import configdoc
from warp_dist.config import WarpConfig
from warp_dist.stages.config import RewardModelConfig, SftConfig

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SECTIONS = ("model", "data", "reward", "rollout", "train", "merge", "eval")
# a dotted config key in prose or a command (not a module path or a file name: those follow a '.', '/' or a word)
KEY = re.compile(rf"(?<![\w./-])((?:{'|'.join(SECTIONS)})(?:\.[a-z][a-z0-9_]*)+)(?![\w/(-])")
FILES = re.compile(r"\.(py|yaml|json|jsonl|md|png|cpp|safetensors|pt|txt|html)$")
NOT_FIELDS = {"train.stepz",  # the README's example of a misspelled key
              "model.load_weights"}  # vLLM's model method (docs/ARCHITECTURE.md)


def test_configuration_reference_is_generated_from_the_config():
    doc = (ROOT / "docs" / "configuration.md").read_text()
    assert doc == configdoc.markdown(), "docs/configuration.md is stale: python -m warp_dist.configdoc > docs/configuration.md"
    for key in configdoc.keys(WarpConfig):
        assert f"| `{key}` |" in doc, key


def test_every_field_has_a_meaning():
    for cls in (WarpConfig, SftConfig, RewardModelConfig):
        missing = [key for key, _, _, doc in configdoc.rows(cls) if not doc]
        assert not missing, f"{cls.__name__}: fields without a comment in the dataclass: {missing}"


def test_the_docs_name_only_fields_that_exist():
    known = configdoc.keys(WarpConfig) | configdoc.keys(SftConfig) | configdoc.keys(RewardModelConfig)
    sections = {k.split(".")[0] + "." + k.split(".")[1] for k in known if k.count(".") >= 2}  # e.g. rollout.vllm
    bad = []
    for path in DOCS:
        for key in KEY.findall(path.read_text()):
            key = key.rstrip(".")
            if FILES.search(key) or key in known or key in sections or key in NOT_FIELDS:
                continue
            named = re.fullmatch(r"reward\.terms\.\w+(\.(\w+))?", key)  # reward.terms.<name>[.<reward field>]
            if named and (named.group(2) is None or f"reward.{named.group(2)}" in known):
                continue
            bad.append(f"{path.relative_to(ROOT)}: {key}")
    assert not bad, "docs name config fields that do not exist:\n" + "\n".join(bad)
