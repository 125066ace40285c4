"""The kubelet's decisions the agent and the lab repeat: a pod's QoS class, as `pkg/apis/core/helper/qos.GetPodQOS`
(cases after its qos_test.go), and resource quantities as apimachinery reads them."""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import pytest

from nodeagent.cluster.kubelet import QuantityError, qos_class, quantity


def container(requests: dict[str, Any] | None = None, limits: dict[str, Any] | None = None) -> dict[str, Any]:
    resources: dict[str, Any] = {}
    if requests is not None:
        resources["requests"] = requests
    if limits is not None:
        resources["limits"] = limits
    return {"name": "c", "resources": resources}


BOTH = {"cpu": "100m", "memory": "100Mi"}


@pytest.mark.parametrize(("spec", "expected"), [
    ({"containers": [container()]}, "BestEffort"),
    ({"containers": [container(), container()]}, "BestEffort"),
    ({"containers": [container(BOTH, BOTH)]}, "Guaranteed"),
    ({"containers": [container(BOTH, BOTH), container(BOTH, BOTH)]}, "Guaranteed"),
    ({"containers": [container(None, BOTH)]}, "Guaranteed"),  # requests default to limits
    ({"containers": [container({"cpu": "0.1", "memory": "104857600"}, BOTH)]}, "Guaranteed"),  # equal quantities
    ({"containers": [container(BOTH, BOTH), container()]}, "Burstable"),
    ({"containers": [container({"cpu": "50m", "memory": "100Mi"}, BOTH)]}, "Burstable"),
    ({"containers": [container(None, {"cpu": "100m"})]}, "Burstable"),  # memory has no limit
    ({"containers": [container({"memory": "100Mi"})]}, "Burstable"),
    ({"containers": [container({"cpu": "0", "memory": "0"})]}, "BestEffort"),  # zero amounts do not count
    ({"containers": [container({"nvidia.com/gpu": "1"}, {"nvidia.com/gpu": "1"})]}, "BestEffort"),
    ({"containers": [container(BOTH, BOTH)], "initContainers": [container()]}, "Burstable"),
    ({"containers": [container(BOTH, BOTH)], "initContainers": [container(BOTH, BOTH)]}, "Guaranteed"),
    ({}, "BestEffort"),
])
def test_the_qos_class_is_the_kubelets(spec: dict[str, Any], expected: str) -> None:
    assert qos_class(spec) == expected


@pytest.mark.parametrize(("text", "value"), [
    ("100m", Fraction(1, 10)), ("1", Fraction(1)), ("1.5", Fraction(3, 2)), ("128Mi", Fraction(128 * 2**20)),
    ("1Gi", Fraction(2**30)), ("1k", Fraction(1000)), ("2e3", Fraction(2000)), (2, Fraction(2)),
    ("0.5Ki", Fraction(512)),
])
def test_quantities(text: object, value: Fraction) -> None:
    assert quantity(text) == value


@pytest.mark.parametrize("text", ["", "abc", "1KB", "1 Gi", "--1", True, None, [1]])
def test_a_quantity_that_is_not_one_is_refused(text: object) -> None:
    with pytest.raises(QuantityError):
        quantity(text)
