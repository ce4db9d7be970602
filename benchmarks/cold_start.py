"""The app's cold start: seconds from `streamlit run` to a healthy server, and to the Home page drawn in
Chromium. Written to SAVES/bench/cold-start-<time>.json (SAVES: $LSTM_SAVES or the repository's saves/).

    .venv/bin/python -m benchmarks.cold_start          # or: make bench-app
"""
from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path

from .harness import CHROMIUM, CHROMIUM_ARGS, free_port, start_server


def measure(saves: Path, browser=None) -> dict:
    """The two figures over the saves root `saves`, the page drawn in `browser` (a Playwright Browser;
    None: Chromium started here, before the server, so its start-up is not counted). Without Chromium or
    Playwright, the first figure alone and why the second is missing."""
    with contextlib.ExitStack() as stack:
        if browser is None:
            try:
                from playwright.sync_api import sync_playwright
                playwright = stack.enter_context(sync_playwright())
                browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                stack.callback(browser.close)
            except Exception as exc:  # noqa: BLE001 - no browser here: the server figure alone
                browser, why = None, f"{type(exc).__name__}: {exc}"[:200]
        port = free_port()
        logs = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        started = time.perf_counter()
        server = start_server(saves, port, logs / "streamlit.log", poll=0.05)
        stack.callback(server.wait, timeout=20)
        stack.callback(server.terminate)
        out = {"server_ready_s": time.perf_counter() - started}
        if browser is None:
            return {**out, "first_page_error": why}
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{port}")
        page.get_by_role("heading", name="LSTM Studio").wait_for(timeout=120_000)
        out["first_page_s"] = time.perf_counter() - started
        page.close()
    return out


def main() -> int:
    from lstm_core.runs import atomic_write_json, saves_root

    root = saves_root()
    result = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **measure(root)}
    print("app cold start: " + ", ".join(f"{k} {v:.1f} s" if isinstance(v, float) else f"{k} {v}"
                                         for k, v in result.items() if k != "time"))
    out = root / "bench" / f"cold-start-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, result)
    print(f"written to {out}")
    return 0 if "first_page_s" in result else 1


if __name__ == "__main__":
    raise SystemExit(main())
