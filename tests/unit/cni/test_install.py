"""Chaining nodeagent-cni into the node's CNI configuration and out again (no root: files in a temporary
directory standing for /etc/cni/net.d and /opt/cni/bin)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from nodeagent.cni import conflist, install
from nodeagent.cni.conflist import ConflistError, PluginSettings

SETTINGS = PluginSettings("/run/nodeagent/cni.sock", 30.0, "fail")
CALICO = {"name": "k8s-pod-network", "cniVersion": "0.3.1",
          "plugins": [{"type": "calico", "ipam": {"type": "calico-ipam"}}, {"type": "portmap", "snat": True}]}
FLANNEL_CONF = {"cniVersion": "1.0.0", "name": "cbr0", "type": "flannel", "delegate": {"isDefaultGateway": True}}


@pytest.fixture
def paths(tmp_path: Path) -> install.Paths:
    (tmp_path / "net.d").mkdir()
    (tmp_path / "root" / "usr" / "bin").mkdir(parents=True)
    (tmp_path / "root" / "usr" / "bin" / "python3").touch()
    return install.Paths(tmp_path / "net.d", tmp_path / "bin", tmp_path / "root")


def test_the_runtimes_file_is_the_first_in_lexical_order() -> None:
    assert conflist.primary(["99-loopback.conf", "10-calico.conflist", ".hidden.conf", "README"]) == \
        "10-calico.conflist"
    assert conflist.primary(["notes.txt"]) is None


def test_the_plugin_goes_last_in_the_chain_and_the_rest_is_untouched() -> None:
    name, text = conflist.chained("10-calico.conflist", json.dumps(CALICO), SETTINGS)
    document = json.loads(text)
    assert name == "10-calico.conflist"
    assert document["plugins"][:2] == CALICO["plugins"]
    assert document["plugins"][2] == {"type": "nodeagent-cni", "agentSocket": "/run/nodeagent/cni.sock",
                                      "timeoutSeconds": 30.0, "onAgentUnreachable": "fail"}
    assert conflist.is_chained(name, text)
    # Again: one entry, the wanted one.
    _, again = conflist.chained(name, text, PluginSettings("/x.sock", 5, "allow"))
    entries = [p for p in json.loads(again)["plugins"] if p["type"] == "nodeagent-cni"]
    assert entries == [{"type": "nodeagent-cni", "agentSocket": "/x.sock", "timeoutSeconds": 5,
                        "onAgentUnreachable": "allow"}]


def test_a_single_plugin_conf_becomes_a_conflist() -> None:
    name, text = conflist.chained("10-flannel.conf", json.dumps(FLANNEL_CONF), SETTINGS)
    document = json.loads(text)
    assert name == "10-flannel.conflist"
    assert (document["cniVersion"], document["name"]) == ("1.0.0", "cbr0")
    assert document["plugins"][0] == {"type": "flannel", "delegate": {"isDefaultGateway": True}}
    assert document["plugins"][1]["type"] == "nodeagent-cni"


@pytest.mark.parametrize(("text", "names"), [
    ("{", "not JSON"), ("[]", "not a JSON object"), ('{"name": "x"}', "neither"),
    ('{"cniVersion": "0.2.0", "plugins": []}', "cniVersion"), ('{"cniVersion": "1.0.0", "plugins": [1]}', "plugins"),
])
def test_a_configuration_the_plugin_cannot_join_is_an_error_naming_why(text: str, names: str) -> None:
    with pytest.raises(ConflistError, match=names):
        conflist.chained("10-x.conflist", text, SETTINGS)


def test_uninstall_leaves_the_file_as_the_network_plugin_wrote_it() -> None:
    _, text = conflist.chained("10-calico.conflist", json.dumps(CALICO), SETTINGS)
    removed = conflist.unchained("10-calico.conflist", text)
    assert removed is not None and json.loads(removed) == CALICO
    assert conflist.unchained("10-calico.conflist", json.dumps(CALICO)) is None


def test_install_writes_the_plugin_and_chains_it_atomically(paths: install.Paths) -> None:
    (paths.conf_dir / "10-flannel.conf").write_text(json.dumps(FLANNEL_CONF))
    (paths.conf_dir / "99-loopback.conf").write_text(json.dumps({"cniVersion": "1.0.0", "name": "lo",
                                                                 "type": "loopback"}))
    target = install.install(paths, SETTINGS)
    assert target == paths.conf_dir / "10-flannel.conflist"
    assert sorted(p.name for p in paths.conf_dir.iterdir()) == ["10-flannel.conflist", "99-loopback.conf"]
    binary = paths.bin_dir / "nodeagent-cni"
    assert binary.stat().st_mode & 0o111 and binary.read_text().startswith("#!/usr/bin/env python3")
    assert install.chained_now(paths)
    changed = install.uninstall(paths)
    assert changed == [target] and not binary.exists() and not install.chained_now(paths)
    assert "nodeagent-cni" not in target.read_text()


def test_install_refuses_a_node_without_python_or_configuration(paths: install.Paths, tmp_path: Path) -> None:
    with pytest.raises(ConflistError, match="no CNI configuration"):
        install.install(paths, SETTINGS)
    bare = install.Paths(paths.conf_dir, paths.bin_dir, tmp_path / "no-python")
    with pytest.raises(ConflistError, match="python3"):
        install.install(bare, SETTINGS)


def test_the_watch_puts_the_entry_back_when_the_network_plugin_rewrites_its_file(paths: install.Paths) -> None:
    config = paths.conf_dir / "10-calico.conflist"
    config.write_text(json.dumps(CALICO))
    stop = threading.Event()
    thread = threading.Thread(target=install.watch, args=(paths, SETTINGS, stop, 0.05), daemon=True)
    thread.start()
    try:
        for _ in range(2):
            deadline = 200
            while not install.chained_now(paths):
                deadline -= 1
                assert deadline, "not chained in time"
                stop.wait(0.02)
            config.write_text(json.dumps(CALICO))  # Calico's upgrade rewrites it without us
    finally:
        stop.set()
        thread.join(timeout=5)
