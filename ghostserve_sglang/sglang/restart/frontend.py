"""What the supervisor asks of SGLang's tokenizer manager, in the main process of node 0 (node >= 1
runs none): whether the server is up, ``/health`` down during a replacement, a call on its event loop
(which owns its state), rank 0's replacement's questions (``handover``), and error responses for every
pending request at a fail stop."""

from __future__ import annotations

import concurrent.futures
import contextlib

from . import journal

EVENT_LOOP_TIMEOUT_SECONDS = 30.0


class Frontend:
    def __init__(self) -> None:
        self.tokenizer_manager = None

    def up(self) -> bool:
        """Whether SGLang reports the server up (its warm-up done; no replacement under way)."""
        from sglang.srt.managers.tokenizer_manager import ServerStatus

        return getattr(self.tokenizer_manager, "server_status", None) == ServerStatus.Up

    def stopping(self) -> bool:
        """Whether SGLang's SIGTERM handler ran (the server is being stopped on purpose)."""
        return bool(getattr(self.tokenizer_manager, "gracefully_exit", False))

    def set_health(self, up: bool) -> None:
        """``/health`` and ``/ready`` answer 503 while ``up`` is False (SGLang's own start-up state)."""
        from sglang.srt.managers.tokenizer_manager import ServerStatus

        status = ServerStatus.Up if up else ServerStatus.Starting
        with contextlib.suppress(Exception):  # the server may be stopping; node >= 1 has none
            self.call(lambda tm: setattr(tm, "server_status", status))

    def call(self, fn):
        """``fn(tokenizer_manager)``, run on the tokenizer manager's event loop."""
        done: concurrent.futures.Future = concurrent.futures.Future()

        def call() -> None:
            try:
                done.set_result(fn(self.tokenizer_manager))
            except Exception as exc:
                done.set_exception(exc)

        self.tokenizer_manager.event_loop.call_soon_threadsafe(call)
        return done.result(timeout=EVENT_LOOP_TIMEOUT_SECONDS)

    def answer(self, questions) -> None:
        """A question from rank 0's replacement (handover); a closed pipe is left to the wait loop."""
        try:
            question = questions.recv()
        except EOFError:
            questions.close()
            return
        if question == "delivered":
            questions.send(self.call(journal.delivered))

    def abort_pending(self, reason: str) -> bool:
        """Answer every pending request with a 503 naming ``reason`` (on the event loop, not waited
        for); whether there is an event loop to do it."""
        loop = getattr(self.tokenizer_manager, "event_loop", None)
        if loop is None or not loop.is_running():
            return False
        loop.call_soon_threadsafe(self._abort_pending, reason)
        return True

    def _abort_pending(self, reason: str) -> None:
        from sglang.srt.managers.io_struct import AbortReq

        manager = self.tokenizer_manager
        for rid in list(manager.rid_to_state):
            manager._handle_abort_req(AbortReq(rid=rid, abort_message=f"ghostserve: {reason}",
                                               finished_reason={"type": "abort", "status_code": 503,
                                                                "message": f"ghostserve: {reason}"}))
