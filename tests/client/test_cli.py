"""`nmtserve translate` through a real server: arguments and stdin, order, JSON, streaming, and failures."""

from __future__ import annotations

import ctypes
import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from nmtserve_client import Client

pytestmark = pytest.mark.e2e
TIMEOUT = 120


def translate(*args: str, stdin: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nmtserve.cli", "translate", *args], input=stdin, capture_output=True, text=True,
        timeout=TIMEOUT, env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="module")
def expected(server, test_texts) -> dict[str, str]:
    """Each source's translation, through the SDK."""
    with Client(server.address) as client:
        return {source: translation.text for source, translation in zip(test_texts[:24], client.translate(test_texts[:24]))}


def test_texts_as_arguments_and_the_server_from_the_environment(server, test_texts, expected):
    result = translate(*test_texts[:3], env={"NMTSERVE_SERVER": server.address})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [expected[t] for t in test_texts[:3]]


def test_stdin_one_translation_per_line_in_order(server, test_texts, expected):
    texts = test_texts[:24]
    result = translate("--server", server.address, "--texts-per-request", "5", stdin="\n".join(texts) + "\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [expected[t] for t in texts]


def test_blank_lines_stay_blank_and_windows_line_ends_are_read(server, test_texts, expected):
    stdin = f"{test_texts[0]}\r\n\r\n{test_texts[1]}\r\n"
    result = translate("--server", server.address, stdin=stdin)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [expected[test_texts[0]], "", expected[test_texts[1]]]
    n_best = translate("--server", server.address, "--beam-size", "2", "--n-best", "2", stdin=stdin).stdout.splitlines()
    assert len(n_best) == 6 and n_best[2:4] == ["", ""] and all(n_best[:2] + n_best[4:])
    lines = [json.loads(line) for line in translate("--server", server.address, "--json", stdin=stdin).stdout.splitlines()]
    assert [line["source"] for line in lines] == [test_texts[0], "", test_texts[1]] and lines[1]["hypotheses"] == []
    streamed = translate("--server", server.address, "--stream", stdin=stdin)
    assert streamed.stdout.splitlines() == [expected[test_texts[0]], "", expected[test_texts[1]]]


def test_json_n_best_with_scores(server, test_texts):
    result = translate("--server", server.address, "--beam-size", "3", "--n-best", "2", "--json", *test_texts[:2])
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["source"] for line in lines] == test_texts[:2]
    for line in lines:
        scores = [h["score"] for h in line["hypotheses"]]
        assert len(scores) == 2 and scores == sorted(scores, reverse=True) and all(s < 0 for s in scores)


def test_stream_prints_the_same_translations(server, test_texts, expected):
    result = translate("--server", server.address, "--stream", *test_texts[:2])
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [expected[t] for t in test_texts[:2]]
    pieces = translate("--server", server.address, "--stream", "--json", test_texts[0]).stdout.splitlines()
    *partial, final = map(json.loads, pieces)
    assert "".join(p["text"] for p in partial) == final["hypotheses"][0]["text"] == expected[test_texts[0]]


def test_connection_settings_are_refused_naming_their_flags():
    result = translate("--server", "127.0.0.1:1", "--tls-ca", "no/such/ca.pem", "Friday")
    assert result.returncode == 2 and "--tls-ca no/such/ca.pem: no such file" in result.stderr
    assert "Traceback" not in result.stderr
    result = translate("--server", "127.0.0.1:1", "--max-attempts", "9", "--client-cert", "c.pem", "Friday")
    assert result.returncode == 2 and result.stderr == (
        "nmtserve translate: --max-attempts must be between 1 and 5, not 9; --client-cert and --client-key go together; "
        "--client-cert c.pem: no such file\n")


def test_device_is_one_of_onnx_runtimes_and_only_for_bundle(tiny_bundle):
    result = translate("--bundle", str(tiny_bundle), "--device", "gpu", "Friday")
    assert result.returncode == 2 and "argument --device: invalid choice: 'gpu'" in result.stderr
    result = translate("--server", "127.0.0.1:1", "--device", "cpu", "Friday")
    assert (result.returncode, result.stderr) == (2, "nmtserve translate: --device needs --bundle: a server runs on the device "
                                                     "it was started with\n")
    assert translate("--bundle", str(tiny_bundle), "--device", "cpu", "Friday").returncode == 0


def test_an_unreachable_server_is_a_clear_error():
    result = translate("--server", "127.0.0.1:1", "--max-attempts", "1", "Friday")
    assert result.returncode == 1
    assert result.stderr.startswith("nmtserve translate: no serving nmtserve at 127.0.0.1:1: ")
    assert "Traceback" not in result.stderr


def test_rejected_input_is_a_clear_error(server):
    result = translate("--server", server.address, stdin="Friday\n\n" + "Friday " * 300 + "\nMay 2003\n")
    assert result.returncode == 2 and result.stdout == ""
    # Named by its line, blank lines (never sent) counted.
    assert result.stderr.startswith("nmtserve translate: the server refused the input: line 3: ")
    assert result.stderr.endswith(" tokens, the model reads at most 256\n")
    result = translate("--server", server.address, "--stream", "Friday", "", "Friday " * 300)
    assert result.returncode == 2 and "the server refused the input: argument 3: " in result.stderr
    # Lines beyond the first chunk of texts_per_request x max_concurrent_requests are counted from the start too.
    result = translate("--server", server.address, "--texts-per-request", "2", "--max-concurrent-requests", "1",
                       stdin="Friday\n" * 5 + "Friday " * 300 + "\n")
    assert result.returncode == 2 and result.stdout.count("\n") == 4 and "refused the input: line 6: " in result.stderr
    result = translate("--server", server.address, "--texts-per-request", "65", stdin="Friday\n" * 65)  # the server takes 64
    assert result.returncode == 2 and "refused the input: --texts-per-request: 65 texts, at most 64 per request" in result.stderr
    result = translate("--server", server.address, "--beam-size", "2", "--n-best", "3", "Friday")
    assert result.returncode == 2 and "options.num_hypotheses: 3 is above beam_size 2" in result.stderr
    result = translate("--server", server.address, "--stream", "--n-best", "2", "--beam-size", "2", "Friday")
    assert result.returncode == 2 and "--stream decodes greedily: it takes no --beam-size or --n-best" in result.stderr
    result = translate("--bundle", "some/bundle", "--stream", "Friday")
    assert result.returncode == 2 and "--stream needs a server" in result.stderr
    result = translate("--server", server.address, "--beam-size", "-1", "--n-best", "0", "Friday")  # before anything is sent
    assert result.returncode == 2
    assert result.stderr == "nmtserve translate: --beam-size must be at least 1, not -1; --n-best must be at least 1, not 0\n"
    result = translate("--server", server.address, "--min-length", "-1", "Friday")
    assert result.returncode == 2 and result.stderr == "nmtserve translate: invalid input: options.min_length: Value out of range: -1\n"


def test_the_target_language_reaches_the_server(server, test_texts, expected):
    """--target-language is sent with the texts, streamed or not: the server refuses a language its model lacks, naming
    the value, and translates into one it has."""
    languages = server.server.service.model.target_languages
    refusal = ("nmtserve translate: the server refused the input: options.target_language: 'xx' is not one of this "
               f"model's target languages ({', '.join(languages)})\n")
    for stream in ([], ["--stream"]):
        result = translate("--server", server.address, *stream, "--target-language", "xx", test_texts[0])
        assert (result.returncode, result.stdout, result.stderr) == (2, "", refusal), stream
        result = translate("--server", server.address, *stream, "--target-language", languages[0], test_texts[0])
        assert (result.returncode, result.stdout) == (0, expected[test_texts[0]] + "\n"), result.stderr


@pytest.mark.parametrize("options", [
    ["--beam-size", "2", "--n-best", "3"], ["--min-length", "5", "--max-length", "3"], ["--length-penalty", "-5"],
    ["--max-length", "100000"],
], ids=["n-best-above-beam", "min-above-max", "length-penalty", "max-length"])
def test_options_are_refused_in_process_as_the_server_refuses_them(server, tiny_bundle, options):
    """`translate --bundle` is the same command without a server: it used to decode what the server refuses."""
    through_server = translate("--server", server.address, *options, "Friday")
    in_process = translate("--bundle", str(tiny_bundle), *options, "Friday")
    assert through_server.returncode == in_process.returncode == 2 and through_server.stdout == in_process.stdout == ""
    refusal = through_server.stderr.removeprefix("nmtserve translate: the server refused the input: ")
    assert refusal.startswith("options.") and in_process.stderr == f"nmtserve translate: invalid input: {refusal}"
    # With only blank lines nothing is sent, so there is no request to refuse, in-process as through a server.
    blank = [translate(*at, *options, "--target-language", "xx", stdin="\n \n") for at in
             (("--server", server.address), ("--bundle", str(tiny_bundle)))]
    lines = 2 * (int(options[3]) if options[2:3] == ["--n-best"] else 1)  # a blank text prints as its hypotheses would
    assert [(r.returncode, r.stdout, r.stderr) for r in blank] == [(0, "\n" * lines, "")] * 2


@pytest.mark.parametrize("case", ["too-long", "many-too-long", "target-language"])
def test_texts_are_refused_in_process_as_the_server_refuses_them(server, tiny_bundle, case):
    """The same checks in the same words, named by line, with --bundle as through a server."""
    options, stdin = {
        "too-long": ([], "Friday\n\n" + "Friday " * 300 + "\nMay\n"),
        "many-too-long": ([], ("Friday " * 300 + "\n") * 12),  # ten named, and a count of the rest
        "target-language": (["--target-language", "xx"], "Friday\n"),
    }[case]
    through_server = translate("--server", server.address, *options, stdin=stdin)
    in_process = translate("--bundle", str(tiny_bundle), *options, stdin=stdin)
    assert through_server.returncode == in_process.returncode == 2 and through_server.stdout == in_process.stdout == ""
    refusal = through_server.stderr.removeprefix("nmtserve translate: the server refused the input: ")
    assert refusal != through_server.stderr and in_process.stderr == f"nmtserve translate: invalid input: {refusal}"


@pytest.mark.parametrize("where", ["server", "bundle"])
def test_lines_that_show_nothing_stay_blank_and_a_byte_order_mark_is_no_text(server, tiny_bundle, test_texts, expected, where):
    """Blank as the server counts blank (invisible, filler and lone combining characters): printed blank, never sent;
    the byte-order mark a Windows editor writes first is not part of the first line."""
    at = ("--server", server.address) if where == "server" else ("--bundle", str(tiny_bundle))
    stdin = f"\ufeff{test_texts[0]}\n\u200b\n\u3164\n\u0301\n{test_texts[1]}\n"
    result = translate(*at, stdin=stdin)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [expected[test_texts[0]], "", "", "", expected[test_texts[1]]]
    assert translate(*at, stdin="\ufeff\n").stdout == "\n"


def test_a_closed_stdin_is_no_input(server):
    result = subprocess.run(["bash", "-c", f"{sys.executable} -m nmtserve.cli translate --server {server.address} <&-"],
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_input_that_is_not_utf8_is_a_clear_error(server, tiny_bundle):
    result = subprocess.run([sys.executable, "-m", "nmtserve.cli", "translate", "--server", server.address],
                            input=b"Friday\ncaf\xe9\n", capture_output=True, timeout=TIMEOUT)
    assert result.returncode == 2
    assert result.stderr.decode() == "nmtserve translate: invalid input: line 2: not UTF-8 text (byte 4 of the line)\n"
    # An argument that is not UTF-8 reaches Python as a lone surrogate (os.fsdecode), with --bundle as without.
    for where in (("--server", server.address), ("--bundle", str(tiny_bundle))):
        result = subprocess.run([sys.executable, "-m", "nmtserve.cli", "translate", *where, "Friday", b"caf\xe9"],
                                capture_output=True, timeout=TIMEOUT)
        assert result.returncode == 2, result.stderr
        assert result.stderr.decode().startswith("nmtserve translate: invalid input: argument 2: not valid Unicode text")


def _running(*args: str) -> subprocess.Popen:
    """`nmtserve translate` reading stdin a line at a time (one text per request, one request at a time)."""
    command = [sys.executable, "-m", "nmtserve.cli", "translate", "--texts-per-request", "1", "--max-concurrent-requests", "1", *args]
    # faulthandler: a SIGABRT makes it print every thread's stack, for _exit_status to show where it hangs.
    return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONFAULTHANDLER": "1"})


@pytest.fixture()
def sigint_as_at_a_terminal() -> Iterator[None]:
    """SIGINT handled here, so that the commands started meanwhile get its default action, as at a terminal: a suite
    started in the background (`make test &`) ignores it, and a command inherits an ignored signal."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _exit_status(process: subprocess.Popen) -> int:
    """The process's exit status; a failure showing its threads' stacks if it has not ended within TIMEOUT."""
    try:
        return process.wait(TIMEOUT)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGABRT)
        _, stderr = process.communicate(timeout=30)
        pytest.fail(f"still running after {TIMEOUT} s; where its threads were:\n{stderr}")


def test_a_reader_that_stops_reading_ends_it_quietly(server, test_texts):
    translating = _running("--server", server.address)
    translating.stdin.write("\n".join(test_texts[:1] * 200) + "\n")
    translating.stdin.close()
    assert translating.stdout.readline().strip()
    translating.stdout.close()  # as `| head -1` does
    assert _exit_status(translating) == 141  # as for a command that SIGPIPE ends
    assert translating.stderr.read() == ""


def _interrupt_another_thread(pid: int) -> None:
    """SIGINT to one of the process's threads other than its main one, as the kernel may pick for a Ctrl-C, once the
    main thread has gone to sleep waiting for input (a signal that comes before is seen on its way there)."""
    asleep, deadline = 0, time.monotonic() + 10
    while asleep < 5 and time.monotonic() < deadline:
        state = open(f"/proc/{pid}/task/{pid}/stat").read().rpartition(")")[2].split()[0]
        asleep = asleep + 1 if state == "S" else 0
        time.sleep(0.05)
    others = sorted(int(task) for task in os.listdir(f"/proc/{pid}/task") if int(task) != pid)
    assert others, "no thread but the main one: gRPC's would be there"
    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "tgkill"):  # glibc before 2.30, musl
        pytest.skip("this C library has no tgkill() to signal one thread")
    assert libc.tgkill(pid, others[0], signal.SIGINT) == 0, os.strerror(ctypes.get_errno())


@pytest.mark.parametrize("to", [
    "process", pytest.param("another-thread", marks=pytest.mark.skipif(sys.platform != "linux", reason="/proc and tgkill()")),
])
def test_ctrl_c_ends_it_quietly(server, test_texts, to, sigint_as_at_a_terminal):
    translating = _running("--server", server.address)
    translating.stdin.write(test_texts[0] + "\n")
    translating.stdin.flush()
    assert translating.stdout.readline().strip()  # translated; now waiting for the next line
    if to == "process":
        translating.send_signal(signal.SIGINT)
    else:  # Python only marks it pending there: the main thread, waiting for input, must still notice it
        _interrupt_another_thread(translating.pid)
    assert _exit_status(translating) == 130
    assert translating.stderr.read() == ""
    translating.stdin.close()


def test_lines_typed_at_a_terminal_are_translated_as_they_come(server, test_texts):
    terminal, typing = pty.openpty()
    command = [sys.executable, "-m", "nmtserve.cli", "translate", "--server", server.address]
    translating = subprocess.Popen(command, stdin=typing, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    os.close(typing)
    try:
        os.write(terminal, (test_texts[0] + "\n").encode())
        ready, _, _ = select.select([translating.stdout], [], [], TIMEOUT)
        assert ready, "nothing printed for a typed line before the end of the input"
        assert translating.stdout.readline().strip()
        os.write(terminal, b"\x04")  # Ctrl-D: the end of the input
        assert translating.wait(TIMEOUT) == 0, translating.stderr.read()
    finally:
        translating.kill()
        os.close(terminal)
