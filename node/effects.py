"""The one place the node carries out a state machine's effects (protocol/effects.py).

The machines return lists of effects; the contract is that the driver carries them out in
order, each finished before the next starts: a `Persist` before a `Send` is durable before the
message leaves (the provider's agreement row is on disk before its consent goes out, a receipt
before it is sent). `EffectExecutor.run` is that loop, a `match` over the effect types, with
one port (an async callable) per kind of I/O: the store, the stream, the chain, the service
and reports. An effect whose port is missing is an error, not a silent skip, unless the caller
names its type in `leave`: then the caller has said it handles it itself.

A port that raises stops the loop there: nothing after a failed `Persist` is carried out.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from protocol.effects import (Effect, EscrowCall, Persist, Publish, Report, Send, StartService,
                              StopService)

log = logging.getLogger(__name__)

Port = Callable[..., Awaitable[None]]


class MissingPort(RuntimeError):
    """An effect arrived that this executor has no port for (a driver bug)."""


async def log_report(effect: Report) -> None:
    log.info("%s %s", effect.event, effect.detail)


@dataclass
class EffectExecutor:
    """Carries out effects strictly in order through its ports (see the module docstring)."""

    persist: Port | None = None  # Persist -> the store
    send: Port | None = None  # Send -> the peer's stream
    publish: Port | None = None  # Publish -> the offer topic
    escrow: Port | None = None  # EscrowCall -> the chain
    start_service: Port | None = None  # StartService -> the access hook
    stop_service: Port | None = None  # StopService
    report: Port | None = log_report  # Report -> logs and metrics
    leave: tuple[type, ...] = ()  # effect types the caller carries out itself

    async def run(self, effects: Iterable[Effect]) -> None:
        for effect in effects:
            await self.one(effect)

    async def one(self, effect: Effect) -> None:
        if isinstance(effect, self.leave):
            return
        match effect:
            case Persist():
                await self._port(self.persist, effect)(effect)
            case Send():
                await self._port(self.send, effect)(effect)
            case Publish():
                await self._port(self.publish, effect)(effect)
            case EscrowCall():
                await self._port(self.escrow, effect)(effect)
            case StartService():
                await self._port(self.start_service, effect)(effect)
            case StopService():
                await self._port(self.stop_service, effect)(effect)
            case Report():
                await self._port(self.report, effect)(effect)
            case _:
                raise MissingPort(f"unknown effect {effect!r}")

    @staticmethod
    def _port(port: Port | None, effect: Effect) -> Port:
        if port is None:
            raise MissingPort(f"no port for {type(effect).__name__} effects")
        return port
