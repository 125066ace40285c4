"""The benchmarks run end to end at a small size (their numbers are reported, never asserted here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_ingest_benchmark_runs_and_reports_every_measure() -> None:
    result = subprocess.run([sys.executable, "bench/ingest.py", "--services", "300", "--changes", "5", "--no-agent",
                             "--json"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["services"] == 300 and report["changes"] == 5 and "agent" not in report
    assert report["transport"].startswith("https")
    assert 0 < report["first_snapshot_s"] < 60 and 0 < report["reference_bare_list_s"] < 60
    for key in ("change_end_to_end_ms", "change_after_receipt_ms", "snapshot_build_ms"):
        assert 0 < report[key]["p50"] <= report[key]["p99"], key
    assert report["rss_mb"]["first_snapshot"] >= report["rss_mb"]["before"] > 0
    assert len(report["loadavg"]["start"]) == 3


@pytest.mark.root
def test_ingest_benchmark_measures_the_whole_agent_in_a_throwaway_namespace() -> None:
    before = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())
    result = subprocess.run([sys.executable, "bench/ingest.py", "--services", "100", "--changes", "3", "--agent",
                             "--steady", "3", "--sync-period", "2", "--json"], cwd=ROOT, capture_output=True,
                            text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    agent = json.loads(result.stdout.splitlines()[-1])["agent"]
    assert agent["services"] == 100 and agent["iptables_rules"] > 100 * 10 and agent["sync_failures"] == 0
    rss = agent["rss_mb"]
    assert 0 < rss["first_sync"] <= rss["peak_vmhwm"] and 0 < rss["steady_median"] <= rss["steady_max"]
    after = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())
    assert not {ns for ns in after - before if ns.startswith("bingest")}, "the benchmark removes its namespace"


def test_endpoint_choice_benchmark_runs_and_reports_every_measure() -> None:
    result = subprocess.run([sys.executable, "bench/endpoint_choice.py", "--services", "200", "--calls", "2000",
                             "--changes", "3", "--json"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["services"] == 200 and report["calls"] == 2000 and 0 < report["table_build_s"] < 60
    assert 0 < report["table_update_ms"]["p50"] <= report["table_update_ms"]["p99"]
    for key in ("lookup_choose_us", "attempts_us", "authz_us", "breaker_us"):
        assert 0 < report[key]["p50"] <= report[key]["p99"], key


@pytest.mark.root
def test_iptables_benchmark_runs_on_both_backends() -> None:
    result = subprocess.run([sys.executable, "bench/iptables_sync.py", "--services", "60", "--changes", "3",
                             "--repeats", "1", "--json"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert [b["backend"] for b in report["backends"]] == ["legacy", "nft"]
    for backend in report["backends"]:
        assert backend["full_sync_s"] > 0 and backend["bare_restore_s"] > 0 and backend["change_ms"]["n"] == 3
        assert backend["nat_rules"] > 60 * 30


@pytest.mark.root
def test_nftables_benchmarks_run_and_clean_up(tmp_path: Path) -> None:
    before = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())
    result = subprocess.run([sys.executable, "bench/nftables_sync.py", "--services", "40", "--changes", "3",
                             "--repeats", "1", "--skip-legacy", "--json"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["full_sync_s"] > 0 and report["bare_nft_f_s"] > 0 and report["change_ms_nft_binary"]["n"] == 3
    out = tmp_path / "change.json"
    result = subprocess.run([sys.executable, "bench/nftables_change.py", "--services", "40", "--changes", "3",
                             "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    series = json.loads(out.read_text())["ms"]
    assert set(series) == {"product", "lines", "blocks", "floor_counter_rule", "floor_dnat_rule"}
    assert all(s["n"] == 3 and s["p50"] > 0 for s in series.values())
    after = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())
    assert not {name for name in after - before if name.startswith("bench-nft")}


@pytest.mark.root
@pytest.mark.bcc
def test_ebpf_benchmark_runs() -> None:
    result = subprocess.run([sys.executable, "bench/ebpf_connect.py", "--services", "50", "--connects", "40",
                             "--crr-seconds", "0.2", "--changes", "3", "--json"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["connect_us"]["vip"] > 0 and report["crr_per_s"]["vip"] > 0 and report["change_ms"]["n"] == 3
    assert report["map_updates"] > 50 * 10


@pytest.mark.root
def test_hbone_throughput_benchmark_runs() -> None:
    result = subprocess.run([sys.executable, "bench/hbone_throughput.py", "--mib", "8", "--runs", "1", "--json"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert set(report["gbit_per_s"]) == {"bare", "envoy", "nodeagent"}
    assert all(v > 0 for v in report["gbit_per_s"].values())


@pytest.mark.root
def test_hbone_lab_benchmark_runs_every_variant_and_cleans_up() -> None:
    before = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())
    result = subprocess.run([sys.executable, "bench/hbone_lab.py", "--quick", "--json"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.splitlines()[-1])
    variants = {"bare", "envoy", "nodeagent", "tls-relay"}
    assert set(report["throughput"]["gbit_per_s"]) == variants
    assert all(v > 0 for v in report["throughput"]["gbit_per_s"].values())
    rr = report["request_response"]
    assert all(rr["latency_us"][v]["p50"] > 0 and rr["achieved_rate"][v] > 0 for v in variants)
    assert set(report["goals"]) and report["nodeagent_vs_envoy"] > 0
    for variant in variants - {"bare"}:
        for side in ("client", "server"):
            assert rr["tunnels"][variant][side]["vcpu"] > 0 and rr["tunnels"][variant][side]["rss_mb_idle"] > 0
    after = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())
    assert not {ns for ns in after - before if ns.startswith("hb")}, "the benchmark removes its lab"


@pytest.mark.root
def test_mesh_load_benchmark_runs_both_phases_and_cleans_up() -> None:
    before = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())
    result = subprocess.run([sys.executable, "bench/mesh_load.py", "--quick", "--json"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.splitlines()[-1])
    reference, mesh = report["phases"]
    assert (reference["phase"], mesh["phase"]) == ("reference", "mesh")
    assert reference["failures_by_kind"].get("ConnectionRefusedError", 0) > 0, "the dead endpoint is drawn uncaptured"
    assert mesh["failures"] == 0 and mesh["tunnel_metrics"]["retries"] > 0, "the tunnel retries it on another"
    assert mesh["first_byte_ms"]["p50"] > 0 and mesh["vcpu"]["tunnel_node1"] > 0
    after = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())
    assert not {ns for ns in after - before if ns.startswith("ml")}, "the benchmark removes its lab"
