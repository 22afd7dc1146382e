"""The proxy's view of the cluster's instances: where they are, whether they answer.

A health loop asks every instance's ``/health`` each interval. An instance that
stops answering leaves the rotation at once; the loop then asks the instance's
source (its Ray actor) where it is now, since a restarted actor serves on a new
port, and puts it back when it answers again.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Protocol

import httpx

logger = logging.getLogger(__name__)


@dataclass
class Instance:
    name: str
    role: str  # "prefill" | "decode"
    url: str | None = None
    healthy: bool = False
    inflight_requests: int = 0
    outstanding_prompt_tokens: int = 0


class InstanceSource(Protocol):
    async def locate(self, name: str) -> str | None:
        """The instance's current base URL, or None if it is not serving."""


class InstancePool:
    def __init__(
        self,
        instances: list[Instance],
        http: httpx.AsyncClient,
        source: InstanceSource | None = None,
        health_interval_s: float = 2.0,
        health_timeout_s: float = 2.0,
    ) -> None:
        self.instances = {i.name: i for i in instances}
        self._http = http
        self._source = source
        self._interval_s = health_interval_s
        self._timeout_s = health_timeout_s

    def healthy(self, role: str) -> list[Instance]:
        return [i for i in self.instances.values() if i.role == role and i.healthy and i.url]

    def ready(self) -> bool:
        return bool(self.healthy("prefill")) and bool(self.healthy("decode"))

    def mark_unhealthy(self, instance: Instance, reason: str) -> None:
        if instance.healthy:
            logger.warning("%s out of rotation: %s", instance.name, reason)
        instance.healthy = False

    async def check_all(self) -> None:
        await asyncio.gather(*(self._check(i) for i in self.instances.values()))

    async def run(self) -> None:
        """Check forever, every interval. Cancel to stop."""
        while True:
            await self.check_all()
            await asyncio.sleep(self._interval_s)

    async def _check(self, instance: Instance) -> None:
        if instance.url and await self._answers(instance.url):
            if not instance.healthy:
                logger.info("%s in rotation at %s", instance.name, instance.url)
            instance.healthy = True
            return
        self.mark_unhealthy(instance, "health check failed")
        if self._source is not None:
            try:
                url = await asyncio.wait_for(self._source.locate(instance.name), self._timeout_s)
            except Exception:  # the actor is restarting or gone: try again next round
                return
            if url and url != instance.url:
                instance.url = url
                if await self._answers(url):
                    instance.healthy = True
                    logger.info("%s in rotation at %s", instance.name, url)

    async def _answers(self, url: str) -> bool:
        try:
            response = await self._http.get(f"{url}/health", timeout=self._timeout_s)
        except httpx.HTTPError:
            return False
        return response.status_code == 200
