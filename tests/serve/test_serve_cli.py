"""``shpeft serve`` on the command line: safe defaults and one-line errors."""

from __future__ import annotations

import socket

import pytest

from shpeft.cli import main
from shpeft.serve.cli import API_KEY_ENV, bind, is_loopback


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.0.0.2", True), ("localhost", True), ("::1", True),
     ("[::1]", True), ("0.0.0.0", False), ("::", False), ("192.168.1.20", False),
     ("example.org", False)],
)  # fmt: skip
def test_loopback_hosts(host, loopback):
    assert is_loopback(host) is loopback


def test_other_hosts_need_an_api_key(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert main(["serve", "--runs", str(tmp_path), "--host", "0.0.0.0"]) == 2
    assert capsys.readouterr().err.strip() == (
        "shpeft serve: error: binding to 0.0.0.0 makes the server reachable from other "
        f"machines; give an API key with ${API_KEY_ENV} (or --api-key)"
    )


def test_short_api_keys_are_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(API_KEY_ENV, "secret")
    assert main(["serve", "--runs", str(tmp_path), "--host", "0.0.0.0"]) == 2
    assert capsys.readouterr().err.strip() == (
        "shpeft serve: error: the API key must be at least 16 characters long"
    )


def test_nothing_to_serve_ends_in_one_line(tmp_path, capsys):
    assert main(["-q", "serve", "--runs", f"empty={tmp_path}", "--port", "0"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"shpeft serve: error: no run could be served (empty: {tmp_path} is not a shpeft run "
        "directory (no config.json))"
    )


def test_busy_port_is_a_clear_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}: Address already"):
            bind("127.0.0.1", port).close()
