"""Build a backend for a run folder and serve the HTTP app with uvicorn."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from slm_llm.config import load_config
from slm_llm.run import RunDir


def load_backend(run_dir: str | Path, backend: str | None = None, overrides: list[str] | None = None):
    """The ``serve.backend`` (or ``backend``) of the run at ``run_dir``, not started yet."""
    run = RunDir(run_dir)
    run.manifest()  # a clear error when this is not a run folder
    overrides = list(overrides or [])
    if backend:
        overrides.append(f"serve.backend={backend}")
    cfg = load_config(run.root / "run.yaml", overrides)
    if cfg.serve.backend == "vllm":
        from slm_llm.serve.vllm_backend import VLLMBackend

        return VLLMBackend.load(run.root, overrides), cfg
    from slm_llm.serve.hf_backend import HFBackend

    return HFBackend.load(str(run.root), overrides), cfg


def serve(run_dir: str | Path, backend: str | None = None, host: str | None = None, port: int | None = None,
          overrides: list[str] | None = None) -> None:
    import uvicorn

    from slm_llm.serve.app import build_app

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    be, cfg = load_backend(run_dir, backend, overrides)
    serve_cfg = dataclasses.replace(cfg.serve, host=host or cfg.serve.host)  # admin access depends on the bound host
    app = build_app(be, serve_cfg)
    uvicorn.run(app, host=serve_cfg.host, port=serve_cfg.port if port is None else port,
                log_level="info", timeout_graceful_shutdown=5)


class ServerThread:
    """Run ``app`` with uvicorn on a free loopback port in a background thread (tests, benchmarks).

        with ServerThread(app) as url: httpx.get(url + "/health")
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, startup_timeout_s: float = 900):
        import uvicorn

        config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
        # Bound now, not when uvicorn gets to it: the app's startup (a vLLM engine's own ports, say)
        # runs first, and a port that was merely free could be taken by then.
        try:
            self.socket = config.bind_socket()
        except SystemExit:  # uvicorn logs the reason and exits; say it here as a start failure did before
            raise RuntimeError(f"the server failed to bind {host}:{port} (see the log above)") from None
        port = self.socket.getsockname()[1]
        self.url = f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}"
        self.server = uvicorn.Server(config)
        self.startup_timeout_s = startup_timeout_s
        self.thread = None

    def __enter__(self) -> str:
        import threading
        import time

        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + self.startup_timeout_s
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server failed to start (see the log above)")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server did not start in {self.startup_timeout_s} s")
            time.sleep(0.1)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)
        self.socket.close()
