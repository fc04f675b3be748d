"""The example configs ship inside the package, and a checkout's configs/ is that same folder."""

import tomllib
from pathlib import Path

from refine.example_configs import shipped_examples

REPO = Path(__file__).resolve().parents[1]


def test_a_checkouts_configs_holds_the_shipped_examples():
    """README's and deploy/'s commands name configs/NAME.yaml: the files the package ships (a link in a checkout,
    copies in a source distribution), so the two cannot drift apart."""
    shipped = {example.name: example.read_bytes() for example in shipped_examples()}
    assert set(shipped) == {"demo.yaml", "midtrain.yaml", "posttrain.yaml", "service_tiny.yaml", "ttt.yaml"}
    assert {path.name: path.read_bytes() for path in (REPO / "configs").iterdir()} == shipped


def test_the_package_data_covers_every_example():
    """A wheel carries a package's non-Python files only when pyproject.toml's package-data names them."""
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    covered = {path for pattern in package_data["refine"] for path in (REPO / "refine").glob(pattern)}
    assert {REPO / "refine" / "configs" / example.name for example in shipped_examples()} <= covered
