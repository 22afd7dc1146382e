"""The cluster's KV store figures on the proxy's ``/metrics``, from the instances' own.

Each instance exports ``vllm:pd_kv_store_*``: what it asked of its node's store (hits
and misses in tokens by tier, bytes, lookup, load and save latency; pd's connector)
and the store process's own figures (tiers' usage, evictions, corrupt entries, block
latency; ``pd.connector.store_metrics``). ``StoreMetricsAggregate`` keeps each
instance's last answer and exports the sum as ``pd_kv_store_*`` with the same types:

- a sample with a ``store`` label describes a node's store, which several instances
  report alike: it counts once per ``store`` (the highest report, the freshest for a
  counter), its labels kept, so ``sum without (store)`` is the cluster's;
- any other sample is the instance's own: summed over instances (and engines).

vLLM's ``model_name`` and ``engine`` labels are dropped. An instance that does not
answer a scrape keeps contributing its last answer (no dip in a cluster counter); one
that leaves the pool is forgotten.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator

from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

INSTANCE_PREFIX = "vllm:pd_kv_store_"
PROXY_PREFIX = "pd_kv_store_"
SHARED_LABEL = "store"
DROPPED_LABELS = frozenset({"model_name", "engine"})

_Labels = tuple[tuple[str, str], ...]
_Family = tuple[str, str, str]  # an exported family's name, type and help


class StoreMetricsAggregate(Collector):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._latest: dict[str, list[Metric]] = {}  # instance -> its store families

    def update(self, instance: str, metrics_text: str) -> None:
        """Keep ``instance``'s store families from the text of its ``/metrics``."""
        families = list(text_string_to_metric_families(store_lines(metrics_text)))
        with self._lock:
            self._latest[instance] = families

    def keep_only(self, instances: Iterable[str]) -> None:
        """Forget instances that left the pool."""
        keep = set(instances)
        with self._lock:
            for name in set(self._latest) - keep:
                del self._latest[name]

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            reports = list(self._latest.values())
        yield from aggregate(reports)


def store_lines(metrics_text: str) -> str:
    """The store families' lines of a whole ``/metrics`` text (the rest is not parsed)."""
    marks = (INSTANCE_PREFIX, f"# HELP {INSTANCE_PREFIX}", f"# TYPE {INSTANCE_PREFIX}")
    return "".join(line + "\n" for line in metrics_text.splitlines() if line.startswith(marks))


def aggregate(reports: Iterable[list[Metric]]) -> Iterator[Metric]:
    """Each instance's families summed (shared ``store`` samples once), renamed."""
    families: dict[str, _Family] = {}
    values: dict[str, dict[tuple[str, _Labels], float]] = {}
    for report in reports:
        for family in report:
            out_name = PROXY_PREFIX + family.name.removeprefix(INSTANCE_PREFIX)
            families.setdefault(out_name, (out_name, family.type, family.documentation))
            samples = values.setdefault(out_name, {})
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue  # a start time: neither summed nor shared
                name = PROXY_PREFIX + sample.name.removeprefix(INSTANCE_PREFIX)
                labels = tuple(
                    sorted((k, v) for k, v in sample.labels.items() if k not in DROPPED_LABELS)
                )
                key = (name, labels)
                if key not in samples:
                    samples[key] = sample.value
                elif SHARED_LABEL in sample.labels:
                    samples[key] = max(samples[key], sample.value)
                else:
                    samples[key] += sample.value
    for out_name, (name, typ, doc) in families.items():
        metric = Metric(name, doc, typ)
        for (sample_name, labels), value in values[out_name].items():
            metric.add_sample(sample_name, dict(labels), value)
        yield metric
