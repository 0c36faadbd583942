"""What the node's logs may hold: one line per event, no tracebacks from peers, no patient data.

* pynetdicom reports every malformed PDU and every broken connection at ERROR, often with
  a traceback; a hostile or broken peer can fill a disk with them. Its records pass
  through :class:`ProtocolLog`: one line each, without traceback, at most
  :data:`BURST` per :data:`WINDOW_S` seconds and a count of the rest, and every error is
  counted as a protocol error.
* pydicom and highdicom put attribute values into their warnings ("Invalid value for VR
  DA: '1945-01-01'", a person name highdicom finds unusual). :class:`RedactValues` replaces
  every quoted value in their records, and the node asks pydicom not to validate values
  on reading at all: it validates what it copies itself (:mod:`pacs_node.intake.sanitize`).
* :func:`describe` names an exception by its type and where it was raised, never by its
  message (which may quote a value); an exception that ends any thread is logged so, in one
  line.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from pydicom import config as pydicom_config
from pynetdicom import _config as _pynetdicom_config

BURST, WINDOW_S = 10, 60.0
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_PROTOCOL_LEVEL = logging.ERROR


def describe(exc: BaseException) -> str:
    """``ValueError in pacs_node/results/report.py:87 (build_report)``: the type and place, no message."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return type(exc).__name__
    last = frames[-1]
    parts = Path(last.filename).parts
    where = "/".join(parts[-2:]) if len(parts) >= 2 else last.filename
    return f"{type(exc).__name__} in {where}:{last.lineno} ({last.name})"


def redact(message: str) -> str:
    """``message`` with every quoted value replaced, on one line."""
    return " ".join(_QUOTED.sub("'<value withheld>'", message).split())


class RedactValues(logging.Filter):
    """Replace quoted values in the messages of pydicom, highdicom and Python warnings."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact(message)
        if redacted != message or record.args:
            record.msg, record.args = redacted, ()
        record.exc_info = record.exc_text = None
        return True


class Throttle:
    """At most ``burst`` messages per ``window_s`` seconds, and a count of the ones held back."""

    def __init__(self, burst: int = BURST, window_s: float = WINDOW_S) -> None:
        self.burst, self.window_s = burst, window_s
        self._start, self._in_window, self._held = 0.0, 0, 0
        self._lock = threading.Lock()

    def admit(self) -> tuple[bool, int]:
        """Whether to log this message, and how many were held back in the window that just ended."""
        with self._lock:
            now, held = time.monotonic(), 0
            if now - self._start >= self.window_s:
                held, self._held = self._held, 0
                self._start, self._in_window = now, 0
            self._in_window += 1
            if self._in_window > self.burst:
                self._held += 1
                return False, held
            return True, held

    def log(self, logger: logging.Logger, level: int, message: str, *args: object) -> None:
        allowed, held = self.admit()
        if held:
            logger.warning(
                "%d more message(s) like these in the last %.0f s not logged (the audit trail has each)",
                held,
                self.window_s,
            )
        if allowed:
            logger.log(level, message, *args)


class ProtocolLog(logging.Handler):
    """Where pynetdicom's records go: one line each, rate-limited, errors counted."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.out = logging.getLogger("pacs_node.protocol")
        self.listeners: list[Callable[[], None]] = []
        self.throttle = Throttle()

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= _PROTOCOL_LEVEL:
            for listener in list(self.listeners):
                listener()
        if record.levelno < logging.WARNING:
            self.out.log(record.levelno, "%s", _one_line(record))
            return
        self.throttle.log(self.out, logging.WARNING, "peer protocol: %s", _one_line(record))


def _one_line(record: logging.LogRecord) -> str:
    try:
        message = record.getMessage()
    except Exception:  # noqa: BLE001 - a malformed record is still one line
        message = str(record.msg)
    return redact(message)[:300]


def _thread_ended(args: threading.ExceptHookArgs) -> None:
    """An exception that ended a thread: one line, never a traceback (it may quote values).

    pynetdicom's connection threads end so on some malformed input (an event its state
    machine does not expect); the node's own threads are supervised and report themselves.
    """
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread else "?"
    where = describe(args.exc_value) if args.exc_value is not None else args.exc_type.__name__
    if args.exc_type.__module__.startswith("pynetdicom") or "run_reactor" in name:
        logging.getLogger("pynetdicom.protocol").error(
            "a connection thread ended on a protocol error (%s)", where
        )
    else:
        logging.getLogger("pacs_node").error("thread %s ended: %s", name, where)


_installed: ProtocolLog | None = None
_lock = threading.Lock()


def install() -> ProtocolLog:
    """Route pynetdicom through :class:`ProtocolLog`, redact pydicom and highdicom (idempotent)."""
    global _installed
    with _lock:
        if _installed is None:
            _installed = ProtocolLog()
            # pynetdicom's per-PDU logging handlers fail (and log tracebacks) on malformed PDUs.
            _pynetdicom_config.LOG_HANDLER_LEVEL = "none"
            network = logging.getLogger("pynetdicom")
            network.addHandler(_installed)
            network.propagate = False
            if network.level == logging.NOTSET or network.level < logging.WARNING:
                network.setLevel(logging.WARNING)
            # Logger filters are not inherited: every logger of these libraries gets one.
            redact_values = RedactValues()
            names = ["pydicom", "highdicom", "py.warnings", *logging.Logger.manager.loggerDict]
            for name in dict.fromkeys(names):
                if name.split(".")[0] in ("pydicom", "highdicom") or name == "py.warnings":
                    logging.getLogger(name).addFilter(redact_values)
            threading.excepthook = _thread_ended
            # The node validates what it copies (pacs_node.intake.sanitize); pydicom's validation on
            # reading would only write the invalid values into the log.
            pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
        return _installed
