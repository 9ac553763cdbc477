"""Pure parts of the ReplicaSet/Deployment controllers."""

from __future__ import annotations

from virtplane.controllers import workloads as w


def test_selector_matching() -> None:
    sel = {"matchLabels": {"app": "a"}, "matchExpressions": [
        {"key": "tier", "operator": "In", "values": ["web", "api"]}, {"key": "x", "operator": "DoesNotExist"}]}
    assert w.selector_matches(sel, {"app": "a", "tier": "web"})
    assert not w.selector_matches(sel, {"app": "a", "tier": "db"})
    assert not w.selector_matches(sel, {"app": "a", "tier": "web", "x": "1"})
    assert w.selector_matches({}, {"anything": "1"})


def test_int_or_percent_rounding() -> None:
    assert w.int_or_percent("25%", 3, round_up=True) == 1
    assert w.int_or_percent("25%", 3, round_up=False) == 0
    assert w.int_or_percent(2, 3, round_up=False) == 2


def test_template_hash_is_stable_and_sensitive() -> None:
    a = {"metadata": {"labels": {"app": "a"}}, "spec": {"containers": [{"name": "c", "image": "i:1"}]}}
    b = {"spec": {"containers": [{"image": "i:1", "name": "c"}]}, "metadata": {"labels": {"app": "a"}}}
    assert w.template_hash(a) == w.template_hash(b)
    assert len(w.template_hash(a)) == 10
    a2 = {**a, "spec": {"containers": [{"name": "c", "image": "i:2"}]}}
    assert w.template_hash(a2) != w.template_hash(a)


def test_availability_respects_min_ready_seconds() -> None:
    pod = {"metadata": {}, "status": {"conditions": [
        {"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}}
    t = 1767225600.0  # 2026-01-01T00:00:00Z
    assert w.pod_available(pod, 0, t)
    assert not w.pod_available(pod, 10, t + 5)
    assert w.pod_available(pod, 10, t + 10)
    assert not w.pod_available({"metadata": {}, "status": {}}, 0, t)
