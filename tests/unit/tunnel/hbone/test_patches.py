"""The h2 / hyperframe internals the tunnel replaces or overrides are still there, as it relies on them.

Each failure names the internal: an h2 or hyperframe release inside pyproject.toml's bounds that changes
one must be looked at (patches.py, framing.py) before the bounds are widened.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
from h2.config import H2Configuration
from hyperframe import frame as hyperframe_frame
from hyperframe.frame import ContinuationFrame, DataFrame, PingFrame
from packaging.requirements import Requirement
from packaging.version import Version

from nodeagent.tunnel.hbone import patches
from nodeagent.tunnel.hbone.framing import HboneH2

PYPROJECT = Path(__file__).resolve().parents[4] / "pyproject.toml"


@pytest.mark.parametrize("internal", patches.INTERNALS, ids=lambda internal: internal.name)
def test_each_internal_relied_on_is_as_it_was(internal: patches.Internal) -> None:
    found = patches.problem(internal)
    assert found is None, found


def test_check_passes_on_the_installed_versions() -> None:
    patches.check()


@pytest.mark.parametrize("package", ["h2", "hyperframe"])
def test_the_installed_version_is_within_pyprojects_bounds(package: str) -> None:
    """The bounds are read from pyproject.toml, so this test and the declared dependency cannot drift apart."""
    declared = [Requirement(line) for line in tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]]
    requirement = next((r for r in declared if r.name == package), None)
    assert requirement is not None, f"pyproject.toml no longer declares {package}"
    assert any(spec.operator == "<" for spec in requirement.specifier), \
        f"{package} has no upper bound in pyproject.toml ({requirement}): the tunnel patches its internals"
    installed = Version(version(package))
    assert requirement.specifier.contains(installed), f"{package} {installed} is outside {requirement.specifier}"


class HyperframesOwn(DataFrame):
    """A DATA frame serialized by hyperframe's own serialize_body, whatever install() put on DataFrame."""

    serialize_body = patches.HYPERFRAME.data_serialize_body  # type: ignore[assignment]


SHAPES = {  # DATA frames of each shape h2 sends: (stream, data, pad_length, flags)
    "empty": (1, b"", 0, []),
    "plain": (1, b"hello" * 100, 0, []),
    "end_stream": (3, b"last", 0, ["END_STREAM"]),
    "memoryview": (5, memoryview(b"x" * 3000)[1000:2000], 0, []),
    "padded": (7, b"padded", 7, ["PADDED"]),
    "padded_empty": (9, b"", 3, ["PADDED", "END_STREAM"]),
}


@pytest.mark.parametrize("shape", SHAPES)
def test_the_patched_data_frame_serializes_byte_for_byte_as_hyperframe(shape: str) -> None:
    stream, data, pad_length, flags = SHAPES[shape]
    patches.install()
    ours = DataFrame(stream, data=data, pad_length=pad_length, flags=flags).serialize()
    theirs = HyperframesOwn(stream, data=data, pad_length=pad_length, flags=flags).serialize()
    assert bytes(ours) == theirs, f"hyperframe.frame.DataFrame.serialize_body: patched output differs ({shape})"


def test_the_short_hex_repr_is_hyperframes_text() -> None:
    for data in (None, b"", b"\x01", b"0123456789", b"0123456789a", bytes(range(256)) * 300):
        assert patches.short_hex(data) == patches.HYPERFRAME.raw_data_repr(data), data
    patches.install()
    block = b"header" * 1000
    shown = patches.HYPERFRAME.raw_data_repr(block)
    assert repr(ContinuationFrame(1, data=block)) == f"ContinuationFrame(stream_id=1, flags=[]): data={shown}"
    assert repr(DataFrame(1, data=b"x" * 70000)) == "DataFrame(stream_id=1, length=70000)"


def test_install_is_idempotent_and_explicit() -> None:
    patches.install()
    assert patches.installed()
    replaced = (hyperframe_frame._raw_data_repr, DataFrame.__dict__["serialize_body"], DataFrame.__dict__["__repr__"])
    patches.install()
    assert (hyperframe_frame._raw_data_repr, DataFrame.__dict__["serialize_body"],
            DataFrame.__dict__["__repr__"]) == replaced == (patches.short_hex, patches.data_body, patches.data_repr)
    assert PingFrame(0, opaque_data=b"12345678").serialize()[:9] == b"\x00\x00\x08\x06\x00\x00\x00\x00\x00"


def test_importing_the_tunnel_changes_nothing_in_hyperframe() -> None:
    """In a fresh interpreter: every HBONE module imported, nothing installed yet."""
    code = ("import nodeagent.tunnel.hbone.client, nodeagent.tunnel.hbone.server, nodeagent.tunnel.proxy.node\n"
            "from nodeagent.tunnel.hbone import patches\n"
            "assert not patches.installed(), 'an import installed the hyperframe patches'\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PYPROJECT.parent)


def test_a_connection_installs_them() -> None:
    """Making an HBONE h2 connection installs the specialisations (importing the modules does not)."""
    HboneH2(config=H2Configuration(client_side=True))
    assert patches.installed()
