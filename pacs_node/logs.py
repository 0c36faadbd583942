"""What the node's logs may hold: one line per event, no tracebacks from peers, no patient data.

* pynetdicom reports every malformed PDU and every broken connection at ERROR, often with
  a traceback; a hostile or broken peer can fill a disk with them. Its records pass
  through :class:`ProtocolLog`: one line each, without traceback, at most
  :data:`BURST` per :data:`WINDOW_S` seconds and a count of the rest, and every error is
  counted as a protocol error.
* pydicom and highdicom put attribute values into their warnings ("Invalid value for VR
  DA: '1945-01-01'", a person name highdicom finds unusual). :class:`RedactValues` replaces
  every quoted value in their records, and the node asks pydicom not to validate values
  on reading at all: it validates what it copies itself (:mod:`pacs_node.sanitize`).
* :func:`describe` names an exception by its type and where it was raised, never by its
  message (which may quote a value).
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
    """``ValueError in pacs_node/report.py:87 (build_report)``: the type and place, no message."""
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


class ProtocolLog(logging.Handler):
    """Where pynetdicom's records go: one line each, rate-limited, errors counted."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.out = logging.getLogger("pacs_node.protocol")
        self.listeners: list[Callable[[], None]] = []
        self._window_start, self._in_window, self._suppressed = 0.0, 0, 0
        self._state = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= _PROTOCOL_LEVEL:
            for listener in list(self.listeners):
                listener()
        if record.levelno < logging.WARNING:
            self.out.log(record.levelno, "%s", _one_line(record))
            return
        allowed, suppressed = self._admit()
        if suppressed:
            self.out.warning("%d more protocol message(s) in the last %.0f s not logged", suppressed, WINDOW_S)
        if allowed:
            self.out.log(logging.WARNING, "peer protocol: %s", _one_line(record))

    def _admit(self) -> tuple[bool, int]:
        with self._state:
            now = time.monotonic()
            suppressed = 0
            if now - self._window_start >= WINDOW_S:
                suppressed, self._suppressed = self._suppressed, 0
                self._window_start, self._in_window = now, 0
            self._in_window += 1
            if self._in_window > BURST:
                self._suppressed += 1
                return False, suppressed
            return True, suppressed


def _one_line(record: logging.LogRecord) -> str:
    try:
        message = record.getMessage()
    except Exception:  # noqa: BLE001 - a malformed record is still one line
        message = str(record.msg)
    return redact(message)[:300]


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
            # The node validates what it copies (pacs_node.sanitize); pydicom's validation on
            # reading would only write the invalid values into the log.
            pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
        return _installed
