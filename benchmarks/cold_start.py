"""The app's cold start: seconds from `streamlit run` to a healthy server, and to the Home page drawn in
Chromium. Written to SAVES/bench/cold-start-<time>.json (SAVES: $LSTM_SAVES or the repository's saves/).

    .venv/bin/python -m benchmarks.cold_start          # or: make bench-app
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from .harness import CHROMIUM, CHROMIUM_ARGS, free_port, start_server


def measure(saves: Path) -> dict:
    """The two figures over the saves root `saves`; without Chromium (or Playwright), the first alone and
    why the second is missing."""
    port = free_port()
    with tempfile.TemporaryDirectory() as logs:
        started = time.perf_counter()
        server = start_server(saves, port, Path(logs) / "streamlit.log", poll=0.05)
        out = {"server_ready_s": time.perf_counter() - started}
        try:
            from playwright.sync_api import sync_playwright
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                page = browser.new_page()
                page.goto(f"http://127.0.0.1:{port}")
                page.get_by_role("heading", name="LSTM Studio").wait_for(timeout=120_000)
                out["first_page_s"] = time.perf_counter() - started
                browser.close()
        except Exception as exc:  # noqa: BLE001 - no browser here: report the server figure alone
            out["first_page_error"] = f"{type(exc).__name__}: {exc}"[:200]
        finally:
            server.terminate()
            server.wait(timeout=20)
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
