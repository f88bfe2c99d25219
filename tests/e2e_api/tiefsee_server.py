"""Starts `tiefsee serve` on a free loopback port for a bounded time, and always stops it.

Shared by the pytest fixtures in this folder and by bench/serve_load.py. Standard library only.
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FIXTURE_MODEL = REPO / "tests" / "fixtures" / "models" / "deepseek-v3"
R1_TEMPLATE = REPO / "tests" / "fixtures" / "templates" / "deepseek-r1.jinja"
HOST = "127.0.0.1"


def binary() -> Path:
    """The release binary (`TIEFSEE_BIN` overrides); build it with `cargo build --release -p tiefsee`."""
    path = Path(os.environ.get("TIEFSEE_BIN", REPO / "target" / "release" / "tiefsee"))
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `cargo build --release -p tiefsee` first")
    return path


def free_port() -> int:
    # The port could be taken between this probe and the server's bind; the server then fails to
    # start and `Server` reports it with the server's own log.
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 5.0, headers: dict | None = None) -> dict:
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


class Server:
    """`tiefsee serve --model MODEL ARGS...` on a free loopback port; use as a context manager.

    The process is killed on exit however the block ends, and also after `lifetime_s` seconds by
    `timeout(1)`, so that nothing outlives a crashed test run.
    """

    def __init__(self, model: Path = FIXTURE_MODEL, args: list[str] = (), lifetime_s: int = 900,
                 log: Path | None = None):
        self.model = Path(model)
        self.args = list(args)
        self.lifetime_s = lifetime_s
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.log = log
        self._log_file = None
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "Server":
        command = ["timeout", "-s", "KILL", str(self.lifetime_s), str(binary()), "serve",
                   "--model", str(self.model), "--host", HOST, "--port", str(self.port), *self.args]
        self._log_file = open(self.log, "wb") if self.log else subprocess.DEVNULL
        self.process = subprocess.Popen(command, stdout=self._log_file, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        try:
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_healthy(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tiefsee serve exited with {self.process.returncode} "
                                   f"(log: {self.log or 'not kept'})")
            with contextlib.suppress(OSError, ValueError):
                if get_json(self.url + "/health", timeout=2.0).get("status") == "ok":
                    return
            time.sleep(0.2)
        raise TimeoutError(f"tiefsee serve did not answer /health within {timeout_s} s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            # The whole session: `timeout` and the server under it.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=10)
        if self._log_file not in (None, subprocess.DEVNULL):
            self._log_file.close()
            self._log_file = None

    def __exit__(self, *exc) -> None:
        self.stop()
