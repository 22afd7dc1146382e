"""The proxy's view of the cluster's instances: where they are, whether they answer.

A health loop asks every instance's ``/health`` each interval. An instance that
refuses the connection or answers with an error leaves the rotation at once; one
that accepts the connection but does not answer in time (stopped, or starved of CPU
under load) leaves after ``health_misses`` such checks in a row, so that one slow
answer under overload does not take the only decode instance away. The loop then
asks the instance's source (its Ray actor) where it is now, since a restarted actor
serves on a new port, and puts it back when it answers again.

A request that fails on an instance makes the pool check that instance at once
(``suspect``) instead of taking it out: one broken connection (a reset under load, a
keep-alive connection the server closed as it was reused) is no proof that the
instance is gone, and ejecting the only prefill instance for it turned every
request of the next seconds into a 503. A crashed instance refuses the check's
connection and leaves within milliseconds.

An instance leaving the rotation sets its ``left`` event: requests waiting on it
(a prefill leg on a stopped instance) give up then and fall back, instead of waiting
out the request deadline on an instance declared gone.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Protocol

import httpx

logger = logging.getLogger(__name__)

# Health probe outcomes besides an error's description.
_OK = "ok"
_SLOW = "no answer in time"


@dataclass
class Instance:
    name: str
    role: str  # "prefill" | "decode"
    url: str | None = None
    healthy: bool = False
    inflight_requests: int = 0
    outstanding_prompt_tokens: int = 0
    slow_checks: int = 0  # health checks in a row that timed out
    # Set when the instance leaves rotation; a fresh one each time it comes back, so
    # a request holds the event of the time in rotation it was sent in.
    left: asyncio.Event = field(default_factory=asyncio.Event, repr=False, compare=False)


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
        health_misses: int = 2,
    ) -> None:
        if health_misses < 1:
            raise ValueError(f"health_misses must be at least 1, not {health_misses}")
        self.instances = {i.name: i for i in instances}
        self._http = http
        self._source = source
        self._interval_s = health_interval_s
        self._timeout_s = health_timeout_s
        self._misses = health_misses
        self._checks: dict[str, asyncio.Future] = {}  # at most one check per instance

    def healthy(self, role: str) -> list[Instance]:
        return [i for i in self.instances.values() if i.role == role and i.healthy and i.url]

    def mark_unhealthy(self, instance: Instance, reason: str) -> None:
        if instance.healthy:
            logger.warning("%s out of rotation: %s", instance.name, reason)
        instance.healthy = False
        instance.left.set()

    def suspect(self, instance: Instance, reason: str) -> None:
        """A request to ``instance`` failed: check its health now, not at the next round."""
        logger.info("%s: %s; checking its health now", instance.name, reason)
        self._check_once(instance)

    async def check_all(self) -> None:
        await asyncio.gather(*(self._check_once(i) for i in self.instances.values()))

    def _check_once(self, instance: Instance) -> asyncio.Future:
        """The check of ``instance`` in flight, or a new one (checks never overlap, so
        a suspicion and the loop's round count one slow answer once)."""
        check = self._checks.get(instance.name)
        if check is None or check.done():
            check = asyncio.ensure_future(self._check(instance))
            self._checks[instance.name] = check
        return check

    async def run(self) -> None:
        """Check forever, every interval. Cancel to stop."""
        while True:
            await self.check_all()
            await asyncio.sleep(self._interval_s)

    async def _check(self, instance: Instance) -> None:
        answer = await self._probe(instance.url) if instance.url else "no address"
        if answer == _OK:
            self._admit(instance)
            return
        if answer == _SLOW:
            instance.slow_checks += 1
            if instance.healthy and instance.slow_checks < self._misses:
                logger.info("%s: health check timed out (%d of %d in a row)",
                            instance.name, instance.slow_checks, self._misses)  # fmt: skip
                return
        self.mark_unhealthy(instance, f"health check failed: {answer}")
        if self._source is not None:
            try:
                url = await asyncio.wait_for(self._source.locate(instance.name), self._timeout_s)
            except Exception:  # the actor is restarting or gone: try again next round
                return
            if url and url != instance.url:
                instance.url = url
                if await self._probe(url) == _OK:
                    self._admit(instance)

    @staticmethod
    def _admit(instance: Instance) -> None:
        """``instance`` answered its check: in rotation, its count of slow checks reset."""
        instance.slow_checks = 0
        if not instance.healthy:
            logger.info("%s in rotation at %s", instance.name, instance.url)
            if instance.left.is_set():
                instance.left = asyncio.Event()
        instance.healthy = True

    async def _probe(self, url: str) -> str:
        """``_OK``, ``_SLOW`` (connected, no answer in time), or what went wrong."""
        try:
            response = await self._http.get(f"{url}/health", timeout=self._timeout_s)
        except httpx.TimeoutException:
            return _SLOW
        except httpx.HTTPError as e:
            return repr(e)
        return _OK if response.status_code == 200 else f"answered {response.status_code}"
