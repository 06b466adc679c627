"""The server's log format: one key=value line per event, a traceback included."""

from __future__ import annotations

import io
import logging

from nmtserve_server.config import LOG_FORMAT, LOG_TIME_FORMAT, LogfmtFormatter


def test_an_exception_is_logged_on_its_events_one_line():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(LogfmtFormatter(LOG_FORMAT, LOG_TIME_FORMAT))
    log = logging.getLogger("nmtserve_server.test_config")
    log.addHandler(handler)
    log.propagate = False
    try:
        try:
            {}["missing"]
        except KeyError:
            log.exception("event=rpc_failed method=Translate")
    finally:
        log.removeHandler(handler)
    (line,) = stream.getvalue().splitlines()
    assert " level=ERROR logger=nmtserve_server.test_config event=rpc_failed method=Translate traceback=\"Traceback " in line
    assert line.endswith('KeyError: \'missing\'"')
